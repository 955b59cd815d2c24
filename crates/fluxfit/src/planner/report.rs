//! What the planner found, for people: the plan table of `fluxfit plan`, the storage table,
//! and an SVG chart of peak memory against resolution. Front ends print or serve these.

use std::fmt::Write as _;

use candle_core::DType;

use super::choice::StorageChoice;
use super::{
    format_bytes, format_secs, label, predict, Alternative, Budget, Candidate, DeviceProfile,
    ModelSpec, PlanTable, Prediction, Row, Workload,
};
use crate::component::{Component, Phase};

#[allow(clippy::too_many_arguments)]
pub fn render_table(
    spec: &ModelSpec,
    req: &Workload,
    device: &DeviceProfile,
    dtype: DType,
    chunk: Option<usize>,
    table: &PlanTable,
    budget: Option<Budget>,
    pick: Option<&Row>,
    alts: &[Alternative],
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} ({}), {}x{}, {} T5 tokens, {} steps, {}, attention chunk {}{}",
        spec.name,
        spec.variant,
        req.width,
        req.height,
        req.t5_tokens,
        req.steps,
        dtype.as_str(),
        chunk.map_or("none".to_string(), |c| c.to_string()),
        if req.image_input {
            ", with a conditioning image"
        } else {
            ""
        },
    );
    let weights: Vec<String> = Component::ALL
        .iter()
        .map(|k| {
            format!(
                "{} {}",
                k.name(),
                format_bytes(spec.manifest(*k).storage_bytes() as u64)
            )
        })
        .collect();
    let _ = writeln!(s, "weights in storage: {}", weights.join(", "));
    let _ = writeln!(
        s,
        "device: {}{}",
        device.description,
        match budget {
            Some(b) if device.reserve > 0 => format!(
                "; budget {} ({} of it kept in reserve)",
                format_bytes(b.bytes),
                format_bytes(device.reserve)
            ),
            Some(b) => format!("; budget {}", format_bytes(b.bytes)),
            None => "; no budget given (--vram)".into(),
        }
    );
    let _ = writeln!(s);
    // The label column fits the longest label (44 at least, as the tables in the docs).
    let lw = table
        .rows
        .iter()
        .map(|r| r.prediction.label.chars().count())
        .max()
        .unwrap_or(0)
        .max(44);
    let _ = writeln!(
        s,
        "{:<lw$} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>6}  fits",
        "plan", "encode", "denoise", "decode", "peak", "host", "time", "next", "×res."
    );
    for r in &table.rows {
        let p = &r.prediction;
        let ph = |n: Phase| p.phase(n).map_or("-".into(), |x| format_bytes(x.total));
        let fits = match (budget, r.needs) {
            (_, Some(need)) => format!("needs {need}"),
            (Some(b), None) if b.fits(p, device) => "yes".into(),
            (Some(_), None) => "no".into(),
            (None, None) => "".into(),
        };
        let _ = writeln!(
            s,
            "{:<lw$} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>6.2}  {}",
            p.label,
            ph(Phase::Encode),
            ph(Phase::Denoise),
            ph(Phase::Decode),
            format_bytes(p.peak),
            if p.host_peak > 0 {
                format_bytes(p.host_peak)
            } else {
                "-".into()
            },
            format_secs(p.time_s),
            format_secs(p.warm_time_s),
            r.relative,
            fits
        );
    }
    let _ = writeln!(s);
    match (budget, pick) {
        (Some(_), Some(r)) => {
            let _ = writeln!(
                s,
                "picked: {} — peak {}, about {} per image ({:.2}× all-resident)\n  fluxfit generate --plan {}",
                r.prediction.label,
                format_bytes(r.prediction.peak),
                format_secs(r.prediction.time_s),
                r.relative,
                r.prediction.spec
            );
        }
        (Some(b), None) => {
            let smallest = table.smallest().map(|r| &r.prediction);
            let _ = writeln!(
                s,
                "no plan fits {}{}",
                format_bytes(b.bytes),
                smallest.map_or(String::new(), |p| format!(
                    ": the smallest, `{}`, needs {} plus {} reserved",
                    p.label,
                    format_bytes(p.peak),
                    format_bytes(device.reserve)
                ))
            );
            if !alts.is_empty() {
                let _ = writeln!(s, "nearest alternatives:");
                for a in alts {
                    let _ = writeln!(
                        s,
                        "  - {} (peak {}){}",
                        a.description,
                        format_bytes(a.peak),
                        a.needs
                            .map_or(String::new(), |n| format!(" — once fluxfit has {n}"))
                    );
                }
            }
        }
        (None, _) => {
            let _ = writeln!(s, "give --vram BUDGET (or --device CARD) to pick a plan");
        }
    }
    s
}

/// The storage table of `fluxfit plan` with a budget.
pub fn render_storage(choices: &[StorageChoice]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nstorage of the flow and T5 weights in this budget (--quant TYPE plans one; `fluxfit quantize` writes it):"
    );
    let _ = writeln!(
        s,
        "{:<28} {:>9} {:>9}  {:<52} {:>9} {:>6} {:>9}",
        "storage", "flow", "t5", "fastest plan that fits", "peak", "×res.", "error"
    );
    for c in choices {
        let (label, peak, rel) = match &c.plan {
            Some((label, _, peak, rel)) => {
                (label.clone(), format_bytes(*peak), format!("{rel:.2}"))
            }
            None => ("none fits".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            s,
            "{:<28} {:>9} {:>9}  {:<52} {:>9} {:>6} {:>9}",
            c.storage,
            format_bytes(c.flow_bytes),
            format_bytes(c.t5_bytes),
            label,
            peak,
            rel,
            c.error.map_or("-".into(), |e| format!("{e:.1e}"))
        );
    }
    let _ = writeln!(
        s,
        "(the error column: the flow output's relative L2 error against f32 weights, measured on a mid-size model; docs/quantization.md \"Error and speed\")"
    );
    s
}

const COLORS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Peak memory against resolution (same aspect ratio, 0.25 to 4 megapixels) for each runnable
/// plan, the budget as a dashed line; on the right, the picked (or smallest) plan's phases at
/// the requested size as stacked bars of weights, activations and workspace, beside the
/// components' weights.
pub fn chart(
    spec: &ModelSpec,
    req: &Workload,
    device: &DeviceProfile,
    cands: &[Candidate],
    table: &PlanTable,
    budget: Option<Budget>,
    pick: Option<&Row>,
) -> String {
    let gib = (1u64 << 30) as f64;
    let aspect = req.width as f64 / req.height as f64;
    let mps = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0];
    let sized = |mp: f64| -> Workload {
        let h = (mp * 1e6 / aspect).sqrt();
        let w = h * aspect;
        Workload {
            width: ((w as usize) / 16 * 16).max(64),
            height: ((h as usize) / 16 * 16).max(64),
            ..req.clone()
        }
    };
    let runnable: Vec<&Candidate> = cands.iter().filter(|c| c.needs.is_none()).collect();
    let series: Vec<(String, Vec<(f64, f64)>)> = runnable
        .iter()
        .map(|c| {
            let pts = mps
                .iter()
                .map(|&mp| {
                    let r = sized(mp);
                    let p = predict(spec, &r, &c.plan, device);
                    ((r.width * r.height) as f64 / 1e6, p.peak as f64 / gib)
                })
                .collect();
            (label(&c.plan), pts)
        })
        .collect();
    let ymax_data = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .chain(budget.map(|b| b.bytes as f64 / gib))
        .fold(1.0f64, f64::max);
    let ymax = nice_ceiling(ymax_data);
    let (w, h) = (1420.0, 560.0);
    let (x0, y0, pw, ph) = (70.0, 50.0, 560.0, 420.0);
    let xmax = 4.2;
    let px = |x: f64| x0 + x / xmax * pw;
    let py = |y: f64| y0 + ph - y / ymax * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{x0}" y="24" font-size="15">{} — peak device memory by plan ({}, {} T5 tokens, {})</text>"#,
        esc(&spec.name),
        esc(&device.description),
        req.t5_tokens,
        if aspect == 1.0 {
            "square".to_string()
        } else {
            format!("aspect {}:{}", req.width, req.height)
        }
    );
    // Axes and grid.
    let ystep = nice_step(ymax);
    let mut y = 0.0;
    while y <= ymax + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{py:.1}" x2="{x1}" y2="{py:.1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{y}</text>"##,
            py = py(y),
            x1 = x0 + pw,
            tx = x0 - 6.0,
            ty = py(y) + 4.0
        );
        y += ystep;
    }
    for mp in [0.0, 1.0, 2.0, 3.0, 4.0] {
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{yb}" stroke="#eee"/><text x="{x:.1}" y="{ty}" text-anchor="middle">{mp}</text>"##,
            x = px(mp),
            yb = y0 + ph,
            ty = y0 + ph + 16.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">megapixels</text><text transform="translate(22 {}) rotate(-90)" text-anchor="middle">peak GiB</text>"#,
        x0 + pw / 2.0,
        y0 + ph + 34.0,
        y0 + ph / 2.0
    );
    if let Some(b) = budget {
        let by = py(b.bytes as f64 / gib);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{by:.1}" x2="{x1}" y2="{by:.1}" stroke="#000" stroke-dasharray="6 4"/><text x="{x1}" y="{ty:.1}" text-anchor="end">budget {}</text>"##,
            format_bytes(b.bytes),
            x1 = x0 + pw,
            ty = by - 5.0
        );
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(y.min(ymax))))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            path.join(" ")
        );
        let ly = y0 + 6.0 + 18.0 * i as f64;
        let lx = x0 + pw + 24.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{b}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{t}" y="{ty}">{}</text>"#,
            esc(name),
            b = lx + 20.0,
            t = lx + 26.0,
            ty = ly + 4.0
        );
    }
    // Bars: the picked (or smallest) plan at the requested size.
    let row = pick.or_else(|| table.smallest());
    if let Some(row) = row {
        let p: &Prediction = &row.prediction;
        let bx0 = 960.0;
        let bmax = nice_ceiling(
            p.peak
                .max(
                    Component::ALL
                        .iter()
                        .map(|k| spec.manifest(*k).storage_bytes() as u64)
                        .sum(),
                )
                .max(1) as f64
                / gib,
        );
        let by = |v: f64| y0 + ph - v / bmax * ph;
        let _ = writeln!(
            s,
            r#"<text x="{bx0}" y="{}" font-size="13">{} at {}x{}: {}</text>"#,
            y0 - 8.0,
            if pick.is_some() { "picked" } else { "smallest" },
            req.width,
            req.height,
            esc(&p.label)
        );
        // Ticks as multiples of the step (a running sum would print 0.060000000000000005).
        let step = nice_step(bmax);
        for i in 0.. {
            let yv = i as f64 * step;
            if yv > bmax + 1e-9 {
                break;
            }
            let _ = writeln!(
                s,
                r##"<line x1="{bx0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#eee"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{label}</text>"##,
                y = by(yv),
                x1 = bx0 + 420.0,
                tx = bx0 - 6.0,
                ty = by(yv) + 4.0,
                label = (yv * 1e6).round() / 1e6
            );
        }
        let parts = [
            ("weights", "#4c72b0"),
            ("activations", "#dd8452"),
            ("workspace", "#937860"),
        ];
        for (i, ph_) in p.phases.iter().enumerate() {
            let x = bx0 + 20.0 + 80.0 * i as f64;
            let mut base = 0.0;
            for (j, v) in [ph_.weights, ph_.activations, ph_.workspace]
                .into_iter()
                .enumerate()
            {
                let v = v as f64 / gib;
                let _ = writeln!(
                    s,
                    r#"<rect x="{x}" y="{y:.1}" width="50" height="{hh:.1}" fill="{}"><title>{} {:.2} GiB</title></rect>"#,
                    parts[j].1,
                    parts[j].0,
                    v,
                    y = by(base + v),
                    hh = (v / bmax * ph).max(0.0)
                );
                base += v;
            }
            let _ = writeln!(
                s,
                r#"<text x="{tx}" y="{ty}" text-anchor="middle">{}</text>"#,
                ph_.phase,
                tx = x + 25.0,
                ty = y0 + ph + 16.0
            );
        }
        // The components' weights in storage, stacked.
        let x = bx0 + 20.0 + 80.0 * 3.0 + 30.0;
        let mut base = 0.0;
        for (i, k) in Component::ALL.iter().enumerate() {
            let v = spec.manifest(*k).storage_bytes() as f64 / gib;
            let c = ["#8172b3", "#937860", "#55a868", "#c44e52"][i];
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{y:.1}" width="50" height="{hh:.1}" fill="{c}"><title>{} {:.2} GiB</title></rect><text x="{tx}" y="{ty:.1}">{} {}</text>"#,
                k.name(),
                v,
                k.name(),
                format_bytes(spec.manifest(*k).storage_bytes() as u64),
                y = by(base + v),
                hh = v / bmax * ph,
                tx = x + 56.0,
                ty = by(base + v / 2.0) + 4.0
            );
            base += v;
        }
        let _ = writeln!(
            s,
            r#"<text x="{tx}" y="{ty}" text-anchor="middle">weights</text>"#,
            tx = x + 25.0,
            ty = y0 + ph + 16.0
        );
        for (j, (name, c)) in parts.iter().enumerate() {
            let lx = bx0 + 20.0 + 110.0 * j as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{lx}" y="{ly}" width="12" height="12" fill="{c}"/><text x="{tx}" y="{ty}">{name}</text>"#,
                ly = y0 + ph + 30.0,
                tx = lx + 16.0,
                ty = y0 + ph + 40.0
            );
        }
    }
    let _ = writeln!(s, "</svg>");
    s
}

fn nice_step(max: f64) -> f64 {
    let raw = max / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let n = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    n * mag
}

fn nice_ceiling(v: f64) -> f64 {
    let step = nice_step(v);
    (v / step).ceil() * step
}

/// Everything `fluxfit plan` shows of one request (the table of plans, the one that fits the
/// budget fastest, the nearest alternatives when none fits), computed once for the CLI and the
/// server alike.
pub struct PlanView {
    pub spec: ModelSpec,
    pub request: Workload,
    pub device: DeviceProfile,
    pub dtype: DType,
    pub chunk: Option<usize>,
    pub candidates: Vec<Candidate>,
    pub table: PlanTable,
    pub budget: Option<Budget>,
    pub alternatives: Vec<Alternative>,
}

impl PlanView {
    /// The plans of `request` on `device` (`candidates`: the presets to weigh), with the
    /// plans that keep as many flow blocks on the device as `budget` allows.
    pub fn new(
        spec: ModelSpec,
        request: Workload,
        device: DeviceProfile,
        (dtype, chunk): (DType, Option<usize>),
        candidates: Vec<Candidate>,
        budget: Option<Budget>,
    ) -> Self {
        let mut table = PlanTable::new(&spec, &request, &device, &candidates);
        if let Some(b) = budget {
            table.add_partial_residency(&spec, &request, &device, b);
        }
        let mut view = Self {
            spec,
            request,
            device,
            dtype,
            chunk,
            candidates,
            table,
            budget,
            alternatives: Vec::new(),
        };
        if let (Some(b), None) = (budget, view.pick()) {
            view.alternatives =
                super::alternatives(&view.spec, &view.request, &view.device, &view.candidates, b);
        }
        view
    }

    /// The fastest plan that fits the budget.
    pub fn pick(&self) -> Option<&Row> {
        self.budget
            .and_then(|b| self.table.fastest_fitting(b, &self.device))
    }

    /// The table as `fluxfit plan` prints it.
    pub fn text(&self) -> String {
        render_table(
            &self.spec,
            &self.request,
            &self.device,
            self.dtype,
            self.chunk,
            &self.table,
            self.budget,
            self.pick(),
            &self.alternatives,
        )
    }

    /// The SVG chart of `fluxfit plan --chart`.
    pub fn chart(&self) -> String {
        chart(
            &self.spec,
            &self.request,
            &self.device,
            &self.candidates,
            &self.table,
            self.budget,
            self.pick(),
        )
    }
}
