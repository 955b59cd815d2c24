//! Residency plans: the same network under every plan gives the same image, the ledger's
//! figures hold against the counting allocator, streaming keeps its window, and the host never
//! holds a second copy of a memory-mapped model.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Tensor};
use fluxfit::component::Phase;
use fluxfit::memory::alloc::{self, CountingAlloc};
use fluxfit::memory::ledger::MemoryReport;
use fluxfit::memory::plan::{Component, Placement, Plan};
use fluxfit::memory::residency::Weights;
use fluxfit::noise::NoiseKind;
use fluxfit::pipeline::tiny::{self, TinyConfigs};
use fluxfit::pipeline::{Generated, LoadOptions, Model, Request};
use fluxfit::variant::Variant;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The allocator's figures are process-wide: tests that measure run one at a time.
static MEASURE: Mutex<()> = Mutex::new(());

fn measure_lock() -> MutexGuard<'static, ()> {
    MEASURE.lock().unwrap_or_else(|e| e.into_inner())
}

const MIB: usize = 1 << 20;

fn request(side: usize, steps: usize) -> Request {
    Request {
        prompt: "a lighthouse on a cliff at dusk".into(),
        width: side,
        height: side,
        steps,
        guidance: 3.5,
        seed: 42,
        t5_tokens: 32,
        noise: NoiseKind::TorchF32,
    }
}

fn options() -> LoadOptions {
    LoadOptions {
        attn_chunk: Some(256),
        variant: Some(Variant::Schnell),
        ..LoadOptions::default()
    }
}

fn plan(model: &Model, spec: &str) -> Plan {
    Plan::resident(DType::F32, model.plan().attn_chunk)
        .with_spec(spec)
        .unwrap_or_else(|e| panic!("plan `{spec}`: {e}"))
}

fn run(model: &mut Model, spec: &str, req: &Request) -> Generated {
    let p = plan(model, spec);
    model.set_plan(p);
    model
        .text_to_image(req, &mut |_| {})
        .unwrap_or_else(|e| panic!("plan `{spec}`: {e}"))
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Sum of the `w` largest of `groups`.
fn largest(mut groups: Vec<usize>, w: usize) -> usize {
    groups.sort_unstable_by(|a, b| b.cmp(a));
    groups.into_iter().take(w).sum()
}

fn flow_bytes(model: &Model) -> usize {
    model.weights(Component::Flow).stage_bytes().iter().sum()
}

fn denoise(r: &MemoryReport) -> &fluxfit::memory::ledger::PhaseMemory {
    r.phase(Phase::Denoise).expect("a denoise phase")
}

#[test]
fn every_plan_gives_the_same_image_bit_for_bit() {
    let _m = measure_lock();
    let mut model = tiny::load_with(
        &TinyConfigs::sized(Variant::Schnell, 128, 2, 3).unwrap(),
        None,
        options(),
    )
    .unwrap();
    let req = request(128, 2);
    let reference = run(&mut model, "resident", &req);
    // Resident keeps everything it used to the end: all of the flow model, and the ledger
    // agrees with what the residencies hold.
    let held: usize = Component::ALL
        .iter()
        .map(|k| model.weights(*k).held_bytes())
        .sum();
    let decode = reference.memory.phase(Phase::Decode).unwrap();
    assert_eq!(decode.weights_end, held, "{}", reference.memory.table());
    assert_eq!(
        model.weights(Component::Flow).held_bytes(),
        flow_bytes(&model)
    );

    for spec in [
        "phase",
        "stream",
        "stream:2:3",
        "stream:1:1",
        "stream:1:2:3",
        "stream:3:2,clip=stream:1:2,vae=stream:2:2",
        "t5-cpu",
        "stream,t5=cpu",
        "phase,t5=cpu,clip=cpu,flow=cpu,vae=cpu",
    ] {
        let out = run(&mut model, spec, &req);
        assert_eq!(
            bits(&out.image),
            bits(&reference.image),
            "image under `{spec}` differs from resident"
        );
        assert_eq!(bits(&out.latents), bits(&reference.latents), "{spec}");
        // Nothing but resident weights outlives its phase.
        for p in &out.memory.phases {
            let resident: usize = Component::ALL
                .iter()
                .filter(|k| model.plan().component(**k).placement == Placement::Resident)
                .map(|k| model.weights(*k).stage_bytes().iter().sum::<usize>())
                .sum();
            assert!(
                p.weights_end <= resident,
                "`{spec}`: {} holds {} bytes after its phase\n{}",
                p.phase,
                p.weights_end,
                out.memory.table()
            );
        }
    }
}

#[test]
fn streaming_prefetches_the_next_group_and_restarts_each_step() {
    let _m = measure_lock();
    let mut model = tiny::load_with(
        &TinyConfigs::sized(Variant::Schnell, 64, 2, 2).unwrap(),
        None,
        options(),
    )
    .unwrap();
    let steps = 3;
    run(&mut model, "stream:1:2", &request(64, steps));
    // embed, 2 double, 2 single, final layer: 6 groups a pass.
    let s = model.weights(Component::Flow).load_stats();
    let groups = 6;
    // The first group of the first two passes is loaded in place (the first pass does not
    // know yet that passes repeat); every other group comes from a prefetch.
    assert_eq!(s.synchronous, 2, "{s:?}");
    assert_eq!(s.prefetched, steps * groups - 2, "{s:?}");
    // The last pass's wrap-around prefetch is cancelled or dropped at the end of the phase.
    assert!(s.issued >= s.prefetched, "{s:?}");
}

#[test]
fn loading_a_stage_reads_that_stage_and_nothing_else() {
    let _m = measure_lock();
    let model = tiny::load(options()).unwrap();
    let plan = Plan::resident(DType::F32, None).with_spec("phase").unwrap();
    let mut model = model;
    model.set_plan(plan);
    for kind in Component::ALL {
        let w = model.weights(kind);
        let file = w.store().files()[0].clone();
        for spec in w.stages().to_vec() {
            let before = file.bytes_read();
            let stage = w.stage(&spec.name).unwrap();
            let read = file.bytes_read() - before;
            assert_eq!(
                read,
                spec.storage_bytes(w.store()),
                "{}: stage {} read {read} bytes",
                kind.name(),
                spec.name
            );
            assert_eq!(stage.bytes(), read, "f32 stored, f32 computed");
            // Asked again within the phase: held, not read again.
            let again = file.bytes_read();
            w.stage(&spec.name).unwrap();
            assert_eq!(file.bytes_read(), again);
        }
        w.release();
    }
}

#[test]
fn a_streamed_flow_holds_its_window_and_a_resident_one_everything() {
    let _m = measure_lock();
    assert!(alloc::installed());
    let mut model = tiny::load_with(
        &TinyConfigs::sized(Variant::Schnell, 256, 3, 3).unwrap(),
        None,
        options(),
    )
    .unwrap();
    let req = request(128, 2);
    let all = flow_bytes(&model);

    let resident = run(&mut model, "resident", &req).memory;
    let r = denoise(&resident);
    assert!(r.measured);
    assert_eq!(r.components["flow"], all, "{}", resident.table());
    assert!(r.total_peak >= all, "{}", resident.table());
    let activations = r.activations_peak.unwrap();

    for (spec, group, window) in [
        ("stream:1:2", 1, 2),
        ("stream:2:3", 2, 3),
        ("stream:1:1", 1, 1),
    ] {
        let report = run(&mut model, spec, &req).memory;
        let d = denoise(&report);
        // The encoders were released at the end of their phase: only the flow model is held.
        assert_eq!(d.weights_peak, d.components["flow"], "{}", report.table());
        let groups = model.weights(Component::Flow).group_bytes(group);
        let window_bytes = largest(groups, window);
        assert!(
            d.weights_peak <= window_bytes,
            "`{spec}`: ledger says {} held, the window is {window_bytes}\n{}",
            d.weights_peak,
            report.table()
        );
        // Measured: at most the window plus the activations a resident run measures (plus a
        // little for the staging of a materialisation and the allocator's slack).
        let bound = window_bytes + activations + activations / 4 + MIB;
        eprintln!(
            "{spec}: denoise measured {} (weights {}), bound {bound}; resident {}",
            d.total_peak, d.weights_peak, r.total_peak
        );
        assert!(
            d.total_peak <= bound,
            "`{spec}`: measured {} > window {window_bytes} + activations {activations}\n{}",
            d.total_peak,
            report.table()
        );
        assert!(d.total_peak < r.total_peak, "{}", report.table());
    }
}

/// Partial residency: the first KEEP flow blocks stay for the phase and only the rest stream,
/// so the denoise phase holds the kept blocks plus the window of the streamed ones, no more, and
/// the streamed ones still arrive by prefetch.
#[test]
fn a_partly_resident_flow_holds_its_kept_blocks_and_a_window() {
    let _m = measure_lock();
    let mut model = tiny::load_with(
        &TinyConfigs::sized(Variant::Schnell, 256, 3, 3).unwrap(),
        None,
        options(),
    )
    .unwrap();
    let req = request(128, 3);
    let stages = model.weights(Component::Flow).stage_bytes();
    let streamed_only = denoise(&run(&mut model, "stream:1:2", &req).memory).weights_peak;
    for keep in [2, 4] {
        let spec = format!("stream:1:2:{keep}");
        let report = run(&mut model, &spec, &req).memory;
        let d = denoise(&report);
        let kept: usize = stages[..keep].iter().sum();
        let window = largest(stages[keep..].to_vec(), 2);
        assert!(
            d.weights_peak >= kept && d.weights_peak <= kept + window,
            "`{spec}`: held {}, kept {kept} + window {window}\n{}",
            d.weights_peak,
            report.table()
        );
        assert!(d.weights_peak > streamed_only, "{}", report.table());
        let stats = model.weights(Component::Flow).load_stats();
        assert!(stats.prefetched > 0, "`{spec}`: {stats:?}");
    }
}

/// Gives the memory freed by earlier tests back to the system, so that it cannot hide a
/// second copy: a run that reused it would not grow `RssAnon`.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim only returns free pages to the system.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Largest `RssAnon` seen by a sampling thread while `f` runs, less the figure before.
fn rss_growth_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    trim_heap();
    let base = alloc::rss_anon().expect("/proc/self/status has RssAnon");
    let max = Arc::new(AtomicUsize::new(base));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (max, stop) = (max.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(r) = alloc::rss_anon() {
                    max.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    let out = f();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    if let Some(r) = alloc::rss_anon() {
        max.fetch_max(r, Ordering::Relaxed);
    }
    (out, max.load(Ordering::Relaxed).saturating_sub(base))
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_streamed_run_keeps_no_second_copy_of_the_model_on_the_host() {
    if alloc::rss_anon().is_none() {
        eprintln!("no /proc/self/status here: skipped");
        return;
    }
    let _m = measure_lock();
    let dir = TempDir(std::env::temp_dir().join(format!("fluxfit-rss-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    // About 75 MB of flow weights in a file, memory-mapped.
    let configs = TinyConfigs::sized(Variant::Schnell, 256, 6, 5).unwrap();
    let mut model = tiny::load_with(&configs, Some(&dir.0), options()).unwrap();
    let file_bytes = std::fs::metadata(dir.0.join("flow.safetensors"))
        .unwrap()
        .len() as usize;
    assert!(file_bytes > 50 * MIB, "{file_bytes}");
    let all = flow_bytes(&model);
    model.set_plan(plan(&model, "stream:1:2"));
    let req = request(128, 2);

    let (out, growth) = rss_growth_during(|| model.text_to_image(&req, &mut |_| {}).unwrap());
    let window = largest(model.weights(Component::Flow).group_bytes(1), 2);
    let d = denoise(&out.memory);
    let activations = out
        .memory
        .phases
        .iter()
        .filter_map(|p| p.activations_peak)
        .max()
        .unwrap();
    let margin = 16 * MIB;
    let bound = window + activations + margin;
    eprintln!(
        "flow {all} bytes, window {window}, activations {activations}, denoise peak {}, RssAnon grew {growth}",
        d.total_peak
    );
    assert!(
        growth <= bound,
        "RssAnon grew {growth} bytes during a streamed run; window {window} + activations \
         {activations} + margin {margin} = {bound}\n{}",
        out.memory.table()
    );
    // The bound excludes a second copy of the flow model.
    assert!(
        bound < all,
        "the test model is too small to tell: {bound} >= {all}"
    );
}

#[test]
fn plan_specs_read_back_and_name_what_is_wrong() {
    let base = Plan::resident(DType::BF16, Some(1024));
    let p = base.with_spec("stream:2:3,t5=cpu").unwrap();
    assert_eq!(p.spec(), "t5=cpu,clip=phase,flow=stream:2:3,vae=phase");
    assert_eq!(base.with_spec(&p.spec()).unwrap(), p);
    assert_eq!(
        base.with_spec("stream").unwrap().flow.placement,
        Placement::Stream {
            group: 1,
            window: 2,
            keep: 0,
        }
    );
    let partial = base.with_spec("flow=stream:1:2:5").unwrap();
    assert_eq!(
        partial.flow.placement,
        Placement::Stream {
            group: 1,
            window: 2,
            keep: 5,
        }
    );
    assert_eq!(base.with_spec(&partial.spec()).unwrap(), partial);
    assert_eq!(
        base.with_spec("t5-cpu").unwrap().spec(),
        "t5=cpu,clip=resident,flow=resident,vae=resident"
    );
    for (bad, names) in [
        ("streem", "streem"),
        ("stream:0", "GROUP `0`"),
        ("stream:1:x", "WINDOW `x`"),
        ("stream:1:2:-1", "KEEP `-1`"),
        ("stream:1:2:3:4", "stream[:GROUP[:WINDOW[:KEEP]]]"),
        ("unet=phase", "unet"),
        ("flow=phase:2", "takes no parameters"),
    ] {
        let e = base.with_spec(bad).unwrap_err().to_string();
        assert!(e.contains(names), "`{bad}`: {e}");
    }
}
