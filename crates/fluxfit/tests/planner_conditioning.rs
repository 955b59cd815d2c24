//! The planner's predictions for runs with a conditioning image (Fill, Control, Kontext with a
//! conditioning image of its own size), for a model with an unmerged LoRA on every Linear and
//! (unmerged, and merged at load with `lora=merged`) and for Redux with two images,
//! against measurement, as `planner_accuracy` does for text to image: weights to the byte,
//! every phase's peak within ±10%.

use candle_core::{DType, Device, Tensor};
use fluxfit::image::Rgb8;
use fluxfit::memory::alloc::CountingAlloc;
use fluxfit::memory::ledger::MemoryReport;
use fluxfit::memory::plan::Plan;
use fluxfit::model::encoder_layer::Activation;
use fluxfit::model::siglip::SiglipConfig;
use fluxfit::noise::NoiseKind;
use fluxfit::pipeline::redux::ReduxImage;
use fluxfit::pipeline::tiny::{self, TinyConfigs};
use fluxfit::pipeline::{LoadOptions, LoraSpec, Model, Request};
use fluxfit::planner::{self, DeviceProfile, ModelSpec, Workload};
use fluxfit::variant::Variant;

mod common;
use common::phases_against;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn model(variant: Variant) -> Model {
    model_with(variant, None)
}

fn model_with(variant: Variant, lora: Option<LoraSpec>) -> Model {
    tiny::load_with(
        &TinyConfigs::sized(variant, 128, 2, 2).unwrap(),
        None,
        LoadOptions {
            attn_chunk: Some(256),
            variant: Some(variant),
            loras: lora.into_iter().collect(),
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

/// A rank-4 LoRA in BFL's layout on every 2-D Linear weight of `flow`'s flow model.
fn lora_on_every_linear(flow: &fluxfit::model::flow::FlowConfig, path: &std::path::Path) {
    let dev = Device::Cpu;
    let mut tensors = std::collections::HashMap::new();
    for (key, shape) in flow.expected_shapes() {
        let (Some(layer), [out, inp]) = (key.strip_suffix(".weight"), shape.as_slice()) else {
            continue;
        };
        let a = Tensor::randn(0f32, 0.02, (4, *inp), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.02, (*out, 4), &dev).unwrap();
        tensors.insert(format!("{layer}.lora_A.weight"), a);
        tensors.insert(format!("{layer}.lora_B.weight"), b);
    }
    candle_core::safetensors::save(&tensors, path).unwrap();
}

/// A Redux encoder in FLUX.1-Redux-dev's layout under `dir`: a SigLIP tower (width 64, 2
/// layers, 112-pixel images in 14-pixel patches: 64 tokens) and a projector to `txt_dim`.
fn redux_encoder(dir: &std::path::Path, txt_dim: usize) {
    let dev = Device::Cpu;
    let tower = dir.join("image_encoder");
    std::fs::create_dir_all(&tower).unwrap();
    let config = SiglipConfig {
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_channels: 3,
        image_size: 112,
        patch_size: 14,
        layer_norm_eps: 1e-6,
        activation: Activation::GeluTanh,
    };
    let json = r#"{"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 112, "patch_size": 14}"#;
    std::fs::write(tower.join("config.json"), json).unwrap();
    let random = |shape: &[usize]| Tensor::randn(0f32, 0.05, shape, &dev).unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = config
        .expected_shapes()
        .into_iter()
        .map(|(k, shape)| (format!("vision_model.{k}"), random(&shape)))
        .collect();
    candle_core::safetensors::save(&tensors, tower.join("model.safetensors")).unwrap();
    let projector: std::collections::HashMap<String, Tensor> = [
        ("redux_up.weight", vec![3 * txt_dim, 64]),
        ("redux_up.bias", vec![3 * txt_dim]),
        ("redux_down.weight", vec![txt_dim, 3 * txt_dim]),
        ("redux_down.bias", vec![txt_dim]),
    ]
    .into_iter()
    .map(|(k, shape)| (k.to_string(), random(&shape)))
    .collect();
    candle_core::safetensors::save(&projector, dir.join("flux1-redux-dev.safetensors")).unwrap();
}

fn request(width: usize, height: usize) -> Request {
    Request {
        prompt: "a cup on a table".into(),
        width,
        height,
        steps: 2,
        guidance: 3.5,
        seed: 3,
        t5_tokens: 32,
        noise: NoiseKind::TorchF32,
    }
}

fn image(w: usize, h: usize, c: usize) -> Tensor {
    Tensor::zeros((1, c, h, w), DType::F32, &Device::Cpu).unwrap()
}

/// Runs `run` under each plan and compares the ledger with the prediction for `req`.
fn check(
    name: &str,
    model: &mut Model,
    req: &Workload,
    run: impl Fn(&Model) -> MemoryReport,
) -> f64 {
    check_plans(name, model, req, &["resident", "phase", "stream:1:2"], run)
}

fn check_plans(
    name: &str,
    model: &mut Model,
    req: &Workload,
    specs: &[&str],
    run: impl Fn(&Model) -> MemoryReport,
) -> f64 {
    let mut worst = 0.0f64;
    for &spec in specs {
        let plan = Plan::resident(DType::F32, Some(256))
            .with_spec(spec)
            .unwrap();
        model.set_plan(plan.clone());
        let _ = run(model); // warm-up of the kernels' thread-local buffers
        model.set_plan(plan.clone()); // a fresh start: nothing resident yet, as predicted
        let measured = run(model);
        let predicted = planner::predict(
            &ModelSpec::from_model(model),
            req,
            &plan,
            &DeviceProfile::cpu_fixed(),
        );
        let (err, lines) = phases_against(&format!("{name:<8} {spec:<11}"), &measured, &predicted);
        println!("{}", lines.join("\n"));
        worst = worst.max(err);
    }
    worst
}

#[test]
fn conditioned_runs_are_predicted_within_ten_percent() {
    if std::env::var("RAYON_NUM_THREADS").is_err() {
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    let (w, h) = (192, 128);
    let req = |cond: Option<(usize, usize)>| Workload {
        image_input: true,
        cond_size: cond,
        ..Workload::of(&request(w, h))
    };
    let mut worst = 0.0f64;

    let mut fill = model(Variant::DevFill);
    worst = worst.max(check("fill", &mut fill, &req(None), |m| {
        m.fill(
            &request(w, h),
            &image(w, h, 3),
            &image(w, h, 1),
            None,
            &mut |_| {},
        )
        .unwrap()
        .memory
    }));

    let mut canny = model(Variant::DevCanny);
    worst = worst.max(check("control", &mut canny, &req(None), |m| {
        m.control(&request(w, h), &image(w, h, 3), None, &mut |_| {})
            .unwrap()
            .memory
    }));

    // Kontext: a conditioning image of another size than the output.
    let (cw, ch) = (128, 256);
    let mut kontext = model(Variant::DevKontext);
    worst = worst.max(check("kontext", &mut kontext, &req(Some((cw, ch))), |m| {
        m.kontext(&request(w, h), &image(cw, ch, 3), None, &mut |_| {})
            .unwrap()
            .memory
    }));

    // An unmerged LoRA on every Linear: each adds its low-rank term, an output-sized tensor.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("every-linear-lora.safetensors");
    let configs = TinyConfigs::sized(Variant::Dev, 128, 2, 2).unwrap();
    lora_on_every_linear(&configs.flow, &path);
    let lora = LoraSpec {
        path,
        scale: Some(0.85),
    };
    let mut with_lora = model_with(Variant::Dev, Some(lora));
    let text = Workload::of(&request(w, h));
    let lora_plans = [
        "resident",
        "phase",
        "stream:1:2",
        "lora=merged",
        "phase,lora=merged",
        "stream:1:2,lora=merged",
    ];
    worst = worst.max(check_plans(
        "lora",
        &mut with_lora,
        &text,
        &lora_plans,
        |m| m.text_to_image(&request(w, h), &mut |_| {}).unwrap().memory,
    ));

    // Redux: a SigLIP tower in the encode phase and two images' tokens on the text.
    let mut redux = model(Variant::Dev);
    let encoder = dir.path().join("redux");
    redux_encoder(&encoder, redux.flow.net.config.context_in_dim);
    redux.attach_redux_from(&encoder, None).unwrap();
    let images: Vec<ReduxImage> = [(40, 30), (30, 50)]
        .into_iter()
        .map(|(w, h)| ReduxImage {
            image: Rgb8 {
                width: w,
                height: h,
                data: vec![128; w * h * 3],
            },
            strength: 1.0,
        })
        .collect();
    let with_images = Workload {
        redux_images: images.len(),
        ..Workload::of(&request(w, h))
    };
    worst = worst.max(check("redux", &mut redux, &with_images, |m| {
        m.redux(&request(w, h), &images, None, None, &mut |_| {})
            .unwrap()
            .memory
    }));

    println!("worst {:.1}%", 100.0 * worst);
    assert!(worst <= 0.10, "worst error {:.1}%", 100.0 * worst);
}
