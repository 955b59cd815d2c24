//! The planner's predictions against measurement: real generations with in-process models of
//! three sizes, at three resolutions, under every kind of plan, measured by the counting
//! allocator and the ledger; the predicted peak of every phase must be within ±10% of the
//! measured one.

use candle_core::DType;
use fluxfit::memory::alloc::CountingAlloc;
use fluxfit::memory::ledger::MemoryReport;
use fluxfit::memory::plan::Plan;
use fluxfit::noise::NoiseKind;
use fluxfit::pipeline::tiny::{self, TinyConfigs};
use fluxfit::pipeline::{LoadOptions, Model, Request};
use fluxfit::planner::{self, DeviceProfile, ModelSpec, Prediction, Workload};
use fluxfit::variant::Variant;

mod common;
use common::phases_against;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn options(chunk: Option<usize>) -> LoadOptions {
    LoadOptions {
        attn_chunk: chunk,
        variant: Some(Variant::Schnell),
        ..LoadOptions::default()
    }
}

fn text2image(width: usize, height: usize, t5_tokens: usize) -> Request {
    Request {
        prompt: "a lighthouse on a cliff at dusk".into(),
        width,
        height,
        steps: 2,
        guidance: 3.5,
        seed: 7,
        t5_tokens,
        noise: NoiseKind::TorchF32,
    }
}

fn measure(model: &mut Model, plan: &Plan, req: &Request) -> MemoryReport {
    model.set_plan(plan.clone());
    model
        .text_to_image(req, &mut |_| {})
        .unwrap_or_else(|e| panic!("plan `{}`: {e}", plan.spec()))
        .memory
}

fn predict(model: &Model, plan: &Plan, req: &Request) -> Prediction {
    let spec = ModelSpec::from_model(model);
    let r = Workload::of(req);
    planner::predict(&spec, &r, plan, &DeviceProfile::cpu_fixed())
}

#[test]
fn predicted_peaks_are_within_ten_percent_of_measured() {
    // The CPU convolution holds one im2col tile per pool thread: fix the pool (before rayon
    // starts it) so that the figures do not depend on the machine. The model itself reads the
    // same variable.
    if std::env::var("RAYON_NUM_THREADS").is_err() {
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut worst = 0.0f64;
    let mut lines = Vec::new();
    for (hidden, depth, single) in [(128, 2, 2), (256, 2, 3), (512, 1, 2)] {
        let configs = TinyConfigs::sized(Variant::Schnell, hidden, depth, single).unwrap();
        let sub = dir.path().join(format!("h{hidden}"));
        std::fs::create_dir_all(&sub).unwrap();
        let mut model = tiny::load_with(&configs, Some(&sub), options(Some(256))).unwrap();
        // Warm up thread-local buffers of the matmul kernels and the thread pool.
        let _ = measure(
            &mut model,
            &Plan::resident(DType::F32, Some(256)),
            &text2image(64, 64, 8),
        );
        for (w, h) in [(128, 128), (256, 192), (320, 320)] {
            let req = text2image(w, h, 64);
            for spec in [
                "resident",
                "phase",
                "stream:1:2",
                "phase,flow=stream:2:2",
                "stream:2:3",
                "stream:1:2:4",
                "stream:1:1",
                "phase,vae-tile=128",
            ] {
                let plan = Plan::resident(DType::F32, Some(256))
                    .with_spec(spec)
                    .unwrap();
                let measured = measure(&mut model, &plan, &req);
                let predicted = predict(&model, &plan, &req);
                let label = format!("h{hidden:<4} {w}x{h:<4} {spec:<22}");
                let (err, mut phase_lines) = phases_against(&label, &measured, &predicted);
                worst = worst.max(err);
                lines.append(&mut phase_lines);
            }
        }
    }
    println!("{}", lines.join("\n"));
    println!("worst {:.1}%", 100.0 * worst);
    assert!(worst <= 0.10, "worst error {:.1}%", 100.0 * worst);
}
