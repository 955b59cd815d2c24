//! Device profiles: how fast a device computes, how fast weights reach it, and what it keeps for
//! itself. The GPU figures are the vendors' dense tensor-core rates (bf16 with f32 accumulation,
//! which is what cuBLAS runs for candle), memory bandwidths and PCIe generations, derated to what
//! an unfused, non-pinned pipeline achieves; the CPU is measured once with a small matmul.

use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::tensor::meta::{ConvImpl, MetaConfig};

const GIB: u64 = 1 << 30;

/// Fraction of the peak matmul rate a large candle matmul reaches.
const MATMUL_EFFICIENCY: f64 = 0.6;
/// Fraction of the memory bandwidth elementwise ops reach.
const BANDWIDTH_EFFICIENCY: f64 = 0.6;
/// Fraction of the PCIe rate a copy from pageable host memory reaches.
const LINK_EFFICIENCY: f64 = 0.4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// The host side of a machine: where `cpu`-placed components compute.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HostProfile {
    /// f32 matmul rate, FLOP/s (candle's CPU backend has no bf16 matmul).
    pub f32_flops: f64,
    /// Elementwise traffic rate, bytes/s.
    pub bandwidth: f64,
    pub threads: usize,
    /// Physical memory, where known.
    pub memory: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeviceProfile {
    /// `cpu`, `rtx4090`, ...
    pub name: String,
    pub description: String,
    pub kind: DeviceKind,
    /// Memory of the card (or the machine's RAM for the CPU).
    pub memory: Option<u64>,
    /// bf16/f16 matmul rate, FLOP/s (already derated).
    pub half_flops: f64,
    /// f32 matmul rate, FLOP/s (already derated).
    pub f32_flops: f64,
    /// Elementwise traffic rate, bytes/s (already derated).
    pub bandwidth: f64,
    /// Fraction of the matmul rate convolutions reach (candle's CPU convolution gathers its
    /// im2col tiles element by element).
    pub conv_efficiency: f64,
    /// Host → device weight rate, bytes/s: PCIe for a GPU, copying out of the memory map for
    /// the CPU.
    pub link: f64,
    /// Whether a prefetched transfer overlaps compute. On the CPU a background thread
    /// materialises the next group; on CUDA the copy stream uploads it through pinned staging
    /// while the compute stream runs (`memory::cuda`; predicted, not yet measured on a GPU).
    pub copy_overlap: bool,
    /// Bytes the device keeps that no plan can use: CUDA context, cuBLAS workspace, allocator
    /// slack. A plan fits a budget when its peak plus this is at most the budget.
    pub reserve: u64,
    pub host: HostProfile,
}

struct Gpu {
    name: &'static str,
    description: &'static str,
    memory_gib: u64,
    /// Dense bf16 tensor TFLOPS with f32 accumulation.
    bf16_tflops: f64,
    f32_tflops: f64,
    bandwidth_gbs: f64,
    /// PCIe GB/s of the slot (x16 4.0: 32, 5.0: 64; x8 4.0: 16).
    pcie_gbs: f64,
}

const GPUS: &[Gpu] = &[
    Gpu {
        name: "rtx3060",
        description: "GeForce RTX 3060 12 GB",
        memory_gib: 12,
        bf16_tflops: 25.6,
        f32_tflops: 12.7,
        bandwidth_gbs: 360.0,
        pcie_gbs: 32.0,
    },
    Gpu {
        name: "rtx3070",
        description: "GeForce RTX 3070 8 GB",
        memory_gib: 8,
        bf16_tflops: 40.6,
        f32_tflops: 20.3,
        bandwidth_gbs: 448.0,
        pcie_gbs: 32.0,
    },
    Gpu {
        name: "rtx3090",
        description: "GeForce RTX 3090 24 GB",
        memory_gib: 24,
        bf16_tflops: 71.0,
        f32_tflops: 35.6,
        bandwidth_gbs: 936.0,
        pcie_gbs: 32.0,
    },
    Gpu {
        name: "rtx4060ti",
        description: "GeForce RTX 4060 Ti 16 GB (PCIe 4.0 x8)",
        memory_gib: 16,
        bf16_tflops: 44.0,
        f32_tflops: 22.1,
        bandwidth_gbs: 288.0,
        pcie_gbs: 16.0,
    },
    Gpu {
        name: "rtx4090",
        description: "GeForce RTX 4090 24 GB",
        memory_gib: 24,
        bf16_tflops: 165.2,
        f32_tflops: 82.6,
        bandwidth_gbs: 1008.0,
        pcie_gbs: 32.0,
    },
    Gpu {
        name: "a100",
        description: "A100 80 GB PCIe",
        memory_gib: 80,
        bf16_tflops: 312.0,
        f32_tflops: 19.5,
        bandwidth_gbs: 1935.0,
        pcie_gbs: 32.0,
    },
    Gpu {
        name: "h100",
        description: "H100 80 GB SXM",
        memory_gib: 80,
        bf16_tflops: 989.0,
        f32_tflops: 67.0,
        bandwidth_gbs: 3350.0,
        pcie_gbs: 64.0,
    },
];

impl DeviceProfile {
    /// The names of the built-in GPU profiles.
    pub fn gpu_names() -> Vec<&'static str> {
        GPUS.iter().map(|g| g.name).collect()
    }

    /// A built-in GPU profile by name (`rtx4090`, `a100`, ...); the host is this machine's CPU.
    pub fn gpu(name: &str) -> Option<Self> {
        let key = name.to_ascii_lowercase().replace(['-', '_', ' '], "");
        let g = GPUS.iter().find(|g| g.name == key)?;
        Some(Self::from_gpu(g, HostProfile::measured()))
    }

    /// A generic CUDA card of `memory` bytes (rates of an RTX 3090, a middle-of-the-road card)
    /// for budgets given without naming a card.
    pub fn generic_cuda(memory: Option<u64>) -> Self {
        let g = GPUS.iter().find(|g| g.name == "rtx3090").expect("listed");
        let mut p = Self::from_gpu(g, HostProfile::measured());
        p.name = "cuda".into();
        p.description = "a CUDA GPU (rates of an RTX 3090)".into();
        p.memory = memory;
        p
    }

    fn from_gpu(g: &Gpu, host: HostProfile) -> Self {
        Self {
            name: g.name.into(),
            description: g.description.into(),
            kind: DeviceKind::Cuda,
            memory: Some(g.memory_gib * GIB),
            half_flops: g.bf16_tflops * 1e12 * MATMUL_EFFICIENCY,
            f32_flops: g.f32_tflops * 1e12 * MATMUL_EFFICIENCY,
            bandwidth: g.bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY,
            conv_efficiency: 1.0,
            link: g.pcie_gbs * 1e9 * LINK_EFFICIENCY,
            copy_overlap: true,
            // CUDA context (~300 MiB), cuBLAS workspace, and allocator slack.
            reserve: 512 << 20,
            host,
        }
    }

    /// This machine's CPU as the compute device, measured once per process.
    pub fn cpu() -> Self {
        Self::cpu_with(HostProfile::measured())
    }

    /// A CPU profile with fixed rates (tests, reproducible tables): 50 GFLOP/s, 5 GB/s; the
    /// thread count (which sizes convolution workspace) is this machine's.
    pub fn cpu_fixed() -> Self {
        Self::cpu_with(HostProfile {
            f32_flops: 50e9,
            bandwidth: 5e9,
            threads: pool_threads(),
            memory: None,
        })
    }

    fn cpu_with(host: HostProfile) -> Self {
        Self {
            name: "cpu".into(),
            description: format!("this machine's CPU ({} threads)", host.threads),
            kind: DeviceKind::Cpu,
            memory: host.memory,
            half_flops: host.f32_flops,
            f32_flops: host.f32_flops,
            bandwidth: host.bandwidth,
            conv_efficiency: CPU_CONV_EFFICIENCY,
            // Copying out of the memory map (page cache) and converting.
            link: host.bandwidth,
            copy_overlap: true,
            // gemm's per-thread L2 slab, allocated on a thread's first matmul and kept for the
            // process: the CPU's equivalent of a CUDA context.
            reserve: ((host.threads + 1) * l2_bytes()) as u64,
            host,
        }
    }

    pub fn is_cpu(&self) -> bool {
        self.kind == DeviceKind::Cpu
    }

    /// The matmul rate for a compute dtype.
    pub fn flops(&self, dtype: DType) -> f64 {
        match dtype {
            DType::BF16 | DType::F16 => self.half_flops,
            _ => self.f32_flops,
        }
    }

    pub(crate) fn meta_config(&self) -> MetaConfig {
        MetaConfig {
            host_is_device: self.is_cpu(),
            conv: if self.is_cpu() {
                ConvImpl::CpuTiled {
                    threads: self.host.threads,
                }
            } else {
                ConvImpl::Im2col
            },
            gemm_workspace: CPU_GEMM_WORKSPACE,
            host_threads: self.host.threads,
            fused: !self.is_cpu(),
            cpu_kernels: self.is_cpu() && crate::tensor::cpu_kernels::enabled(),
        }
    }
}

/// Convolutions against matmuls on candle's CPU backend: measured about 0.4 on the tiny VAE
/// (a rough figure: the machine was shared while it was taken).
pub(crate) const CPU_CONV_EFFICIENCY: f64 = 0.4;

/// Cap of one CPU matmul's packing buffer (gemm bounds its panel by the L3 cache).
const CPU_GEMM_WORKSPACE: usize = 64 << 20;

impl HostProfile {
    /// This machine's CPU: an f32 matmul and an elementwise op timed once per process.
    pub fn measured() -> Self {
        static MEASURED: OnceLock<HostProfile> = OnceLock::new();
        MEASURED.get_or_init(measure).clone()
    }
}

fn measure() -> HostProfile {
    let threads = pool_threads();
    let fallback = HostProfile {
        f32_flops: 50e9,
        bandwidth: 5e9,
        threads,
        memory: ram(),
    };
    let run = || -> crate::Result<HostProfile> {
        let dev = Device::Cpu;
        let n = 384;
        let a = Tensor::ones((n, n), DType::F32, &dev)?;
        // A Linear layer's matmul, through the kernels the networks use.
        let linear = || crate::model::ops::linear(&a, &a, None);
        linear()?; // warm up the thread pool
        let reps = 6;
        let t = Instant::now();
        for _ in 0..reps {
            linear()?;
        }
        let flops = 2.0 * (n * n * n) as f64 * reps as f64 / t.elapsed().as_secs_f64();
        let v = Tensor::ones(1 << 22, DType::F32, &dev)?;
        let _ = (&v + &v)?;
        let t = Instant::now();
        for _ in 0..reps {
            let _ = (&v + &v)?;
        }
        let bw = 3.0 * 4.0 * (1u64 << 22) as f64 * reps as f64 / t.elapsed().as_secs_f64();
        Ok(HostProfile {
            f32_flops: flops,
            bandwidth: bw,
            threads,
            memory: ram(),
        })
    };
    run().unwrap_or(fallback)
}

/// Threads of rayon's global pool, where candle's CPU convolution runs its tiles:
/// `RAYON_NUM_THREADS`, else the logical CPUs.
fn pool_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The L2 cache of one core (`/sys/.../cache/index2/size`), 2 MiB where unreadable.
fn l2_bytes() -> usize {
    let read = || -> Option<usize> {
        let base = "/sys/devices/system/cpu/cpu0/cache/index2";
        let level = std::fs::read_to_string(format!("{base}/level")).ok()?;
        if level.trim() != "2" {
            return None;
        }
        let size = std::fs::read_to_string(format!("{base}/size")).ok()?;
        let t = size.trim();
        let (num, mult) = match t.strip_suffix('K') {
            Some(n) => (n, 1024),
            None => match t.strip_suffix('M') {
                Some(n) => (n, 1 << 20),
                None => (t, 1),
            },
        };
        num.parse::<usize>().ok().map(|n| n * mult)
    };
    read().unwrap_or(2 << 20)
}

/// Total RAM (`MemTotal`), where readable.
pub fn ram() -> Option<u64> {
    meminfo("MemTotal:")
}

/// Available RAM (`MemAvailable`), where readable.
pub fn available_ram() -> Option<u64> {
    meminfo("MemAvailable:")
}

fn meminfo(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}
