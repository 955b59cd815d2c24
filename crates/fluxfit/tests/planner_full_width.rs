//! The planner at FLUX's full width: one double and one single block of hidden 3072, 24 heads
//! of 128, MLP 12288 (the real blocks' shapes, random values) at 1024×1024 with 64 T5 tokens,
//! measured by the counting allocator and the ledger against the prediction, resident and
//! streamed one block at a time. Every phase's peak must be within ±10%.

use candle_core::DType;
use fluxfit::memory::alloc::CountingAlloc;
use fluxfit::memory::plan::Plan;
use fluxfit::model::flow::FlowConfig;
use fluxfit::noise::NoiseKind;
use fluxfit::pipeline::tiny::{self, TinyConfigs};
use fluxfit::pipeline::{LoadOptions, Request};
use fluxfit::planner::{self, DeviceProfile, ModelSpec, Workload};
use fluxfit::variant::Variant;

mod common;
use common::phases_against;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[test]
fn full_width_blocks_at_one_megapixel_are_predicted_within_ten_percent() {
    if std::env::var("RAYON_NUM_THREADS").is_err() {
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    let mut configs = TinyConfigs::sized(Variant::Schnell, 3072, 1, 1).unwrap();
    configs.flow.num_heads = 24;
    configs.flow.mlp_hidden = 12288;
    configs.flow.axes_dim = FlowConfig::default_axes(128).unwrap();
    assert_eq!(configs.flow.axes_dim, vec![16, 56, 56]);
    let dir = tempfile::tempdir().unwrap();
    let options = LoadOptions {
        attn_chunk: Some(1024),
        variant: Some(Variant::Schnell),
        ..LoadOptions::default()
    };
    let mut model = tiny::load_with(&configs, Some(dir.path()), options).unwrap();
    let req = |side: usize| Request {
        prompt: "a lighthouse on a cliff at dusk".into(),
        width: side,
        height: side,
        steps: 1,
        guidance: 3.5,
        seed: 7,
        t5_tokens: 64,
        noise: NoiseKind::TorchF32,
    };
    let mut worst = 0.0f64;
    let mut lines = Vec::new();
    for spec in ["stream:1:1", "resident"] {
        let plan = Plan::resident(DType::F32, Some(1024))
            .with_spec(spec)
            .unwrap();
        // Warm the kernels' thread-local buffers at a small size, then start afresh.
        model.set_plan(plan.clone());
        model.text_to_image(&req(64), &mut |_| {}).unwrap();
        model.set_plan(plan.clone());
        let measured = model.text_to_image(&req(1024), &mut |_| {}).unwrap().memory;
        let predicted = planner::predict(
            &ModelSpec::from_model(&model),
            &Workload::of(&req(1024)),
            &plan,
            &DeviceProfile::cpu_fixed(),
        );
        let (err, mut phase_lines) = phases_against(&format!("{spec:<11}"), &measured, &predicted);
        worst = worst.max(err);
        lines.append(&mut phase_lines);
    }
    println!("{}", lines.join("\n"));
    println!("worst {:.1}%", 100.0 * worst);
    assert!(worst <= 0.10, "worst error {:.1}%", 100.0 * worst);
}
