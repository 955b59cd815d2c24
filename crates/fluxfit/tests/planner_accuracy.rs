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

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const MIB: f64 = (1 << 20) as f64;

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
                "stream:1:1",
                "phase,vae-tile=128",
            ] {
                let plan = Plan::resident(DType::F32, Some(256))
                    .with_spec(spec)
                    .unwrap();
                let measured = measure(&mut model, &plan, &req);
                let predicted = predict(&model, &plan, &req);
                for m in &measured.phases {
                    let p = predicted.phase(m.phase).unwrap();
                    // The residency's shadow holds exactly the bytes the ledger saw.
                    assert_eq!(
                        p.weights_peak as usize, m.weights_peak,
                        "h{hidden} {w}x{h} `{spec}` {}: weights",
                        m.phase
                    );
                    let err = p.total as f64 / m.total_peak as f64 - 1.0;
                    worst = worst.max(err.abs());
                    lines.push(format!(
                        "h{hidden:<4} {w}x{h:<4} {spec:<22} {:<8} measured {:>8.2} MiB (w {:>7.2} a {:>7.2}) predicted {:>8.2} MiB (w {:>7.2} a {:>7.2} ws {:>6.2}) {:+6.1}%",
                        m.phase,
                        m.total_peak as f64 / MIB,
                        m.weights_peak as f64 / MIB,
                        m.activations_peak.unwrap_or(0) as f64 / MIB,
                        p.total as f64 / MIB,
                        p.weights as f64 / MIB,
                        p.activations as f64 / MIB,
                        p.workspace as f64 / MIB,
                        100.0 * err
                    ));
                }
            }
        }
    }
    println!("{}", lines.join("\n"));
    println!("worst {:.1}%", 100.0 * worst);
    assert!(worst <= 0.10, "worst error {:.1}%", 100.0 * worst);
}
