//! What servers and workers say to each other through the broker, as JSON: a worker's
//! advertisement ([`Advert`], its heartbeat), a job as it travels ([`JobSpec`] with its
//! images), and a run's result ([`RunResult`]).

use serde::{Deserialize, Serialize};

use crate::job::{JobSpec, ModelInfo};

/// The three shapes of job a worker's memory is measured against: their encode phase differs
/// (an image to encode or not, a second image's tokens beside the output's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FitKind {
    /// Text only: generate, regions from a blank canvas.
    Text,
    /// With an input image the size of the output: img2img, control, fill, outpaint, refine.
    Image,
    /// Kontext: the output and a conditioning image.
    Edit,
}

impl FitKind {
    pub fn name(self) -> &'static str {
        match self {
            FitKind::Text => "text",
            FitKind::Image => "image",
            FitKind::Edit => "edit",
        }
    }
}

/// The largest job of each kind a worker's planner fits its budget, in image tokens (16×16
/// patches; for an edit, the output's and the conditioning image's together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fits {
    pub text: usize,
    pub image: usize,
    pub edit: usize,
}

impl Fits {
    pub fn of(&self, kind: FitKind) -> usize {
        match kind {
            FitKind::Text => self.text,
            FitKind::Image => self.image,
            FitKind::Edit => self.edit,
        }
    }
}

/// A worker's heartbeat: who it is, what it serves, and how it is doing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Advert {
    pub name: String,
    /// Workers with the same model under the same budget share a pool and its stream.
    pub pool: String,
    pub model: ModelInfo,
    /// The device profile's name (`cpu`, `h100`, …).
    pub device: String,
    /// The budget its planner fits jobs into, in bytes; none: the model's own plan, any size.
    pub budget: Option<u64>,
    /// The plan it loaded with.
    pub plan: String,
    /// What its budget fits; none where there is no budget.
    pub fits: Option<Fits>,
    /// The job it is running.
    pub busy: Option<String>,
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Unix seconds it started.
    pub since: u64,
    pub version: String,
}

impl Advert {
    /// Why this worker cannot run a job of `kind` with `tokens`, if it cannot.
    pub fn refuses(&self, kind: FitKind, tokens: usize) -> Option<String> {
        let fits = self.fits?;
        let max = fits.of(kind);
        (tokens > max).then(|| {
            let side = |t: usize| ((t as f64).sqrt() * 16.0) as usize;
            let budget = match self.budget {
                Some(b) if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
                Some(b) => format!("{} MiB", b >> 20),
                None => String::new(),
            };
            if max == 0 {
                format!(
                    "no {} job fits its budget of {budget}",
                    kind.name()
                )
            } else {
                format!(
                    "{tokens} image tokens (about {s}x{s}) is more than its budget of {budget} fits for a {} job: {max} tokens (about {m}x{m})",
                    kind.name(),
                    s = side(tokens),
                    m = side(max),
                )
            }
        })
    }
}

/// A job as it travels on the stream: its spec with the images inside, as base64, so that a
/// worker on another machine needs nothing else. The server fills in the seed (and steps and
/// guidance), so every worker that runs it makes the same image.
pub fn job_payload(spec: &JobSpec, image: Option<&[u8]>, mask: Option<&[u8]>) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut v = serde_json::to_value(spec).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        // Images given as base64 in the JSON travel as given; uploads are encoded.
        if let Some(i) = image.map(b64).or_else(|| spec.image.clone()) {
            o.insert("image".into(), i.into());
        }
        if let Some(m) = mask.map(b64).or_else(|| spec.mask.clone()) {
            o.insert("mask".into(), m.into());
        }
        // Fields at their defaults are left out: an older worker takes the job as well.
        o.retain(|_, v| !v.is_null() && *v != serde_json::Value::Bool(false));
    }
    v.to_string()
}

/// How a job ended on a worker, as stored under its id.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum RunResult {
    Done {
        /// The PNG, base64, with the CLI's metadata.
        png: String,
        width: usize,
        height: usize,
        seed: u64,
        peak_bytes: usize,
        seconds: f64,
        worker: String,
    },
    Failed {
        error: String,
        worker: String,
    },
    Cancelled {
        reason: String,
        step: usize,
        total: usize,
        worker: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_reads_back_as_the_spec_with_its_images() {
        let spec = JobSpec {
            prompt: "a fox".into(),
            seed: Some(7),
            steps: Some(3),
            ..JobSpec::default()
        };
        let text = job_payload(&spec, Some(b"PNG bytes"), None);
        let back: JobSpec = serde_json::from_str(&text).unwrap();
        assert_eq!(back.prompt, "a fox");
        assert_eq!(back.seed, Some(7));
        assert_eq!(back.steps, Some(3));
        assert_eq!(back.image.as_deref(), Some("UE5HIGJ5dGVz"));
        assert!(back.mask.is_none());
    }

    #[test]
    fn results_keep_their_status_tag() {
        let r = RunResult::Failed {
            error: "boom".into(),
            worker: "w1".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"status\":\"failed\""), "{text}");
        assert!(matches!(
            serde_json::from_str::<RunResult>(&text).unwrap(),
            RunResult::Failed { .. }
        ));
    }
}
