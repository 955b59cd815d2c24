//! The planner's predictions for runs with a conditioning image (Fill, Control, Kontext with a
//! conditioning image of its own size) and for a model with an unmerged LoRA on every Linear,
//! against measurement, as `planner_accuracy` does for text to image: weights to the byte,
//! every phase's peak within ±10%.

use candle_core::{DType, Device, Tensor};
use fluxfit::memory::alloc::CountingAlloc;
use fluxfit::memory::ledger::MemoryReport;
use fluxfit::memory::plan::Plan;
use fluxfit::noise::NoiseKind;
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
    let mut worst = 0.0f64;
    for spec in ["resident", "phase", "stream:1:2"] {
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
    worst = worst.max(check("lora", &mut with_lora, &text, |m| {
        m.text_to_image(&request(w, h), &mut |_| {}).unwrap().memory
    }));

    println!("worst {:.1}%", 100.0 * worst);
    assert!(worst <= 0.10, "worst error {:.1}%", 100.0 * worst);
}
