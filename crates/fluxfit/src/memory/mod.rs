//! Where every byte lives: the plan, residency of weights, the ledger of device bytes and the
//! counting allocator that measures them on the CPU; on CUDA, the upload path and the memory
//! pool's meter.

pub mod alloc;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod ledger;
pub mod plan;
pub mod residency;
pub mod stream;
pub mod upload;

/// CUDA device `ordinal`, opened for fluxfit: kernels on one explicit stream, uploads on a copy
/// stream of their own (`memory::cuda`). A build without the `cuda` feature says how to get one.
pub fn open_cuda(ordinal: usize) -> crate::Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        cuda::open(ordinal)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(crate::Error::Config(format!(
            "cuda:{ordinal}: this fluxfit was built without CUDA; build it with \
             `tools/cuda/setup.sh && tools/cuda/build.sh` (or cargo's `--features cuda`), \
             or run with --device cpu"
        )))
    }
}
