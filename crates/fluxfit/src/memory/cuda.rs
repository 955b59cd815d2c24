//! The CUDA side of memory: opening a device on an explicit compute stream, uploading weights on
//! a copy stream of their own through pinned staging slots, and reading the memory pool's
//! high-water marks for the ledger.
//!
//! Why an explicit compute stream: candle's `Device::new_cuda` computes on the *per-thread*
//! default stream, so a prefetch thread's copy ran on another stream than the kernels that read
//! its result, with nothing ordering the two. Here every kernel runs on one created stream and
//! every upload on a second; cudarc then records a write event on each uploaded buffer and makes
//! the compute stream wait for it before the first kernel reads it, and frees a buffer on the copy
//! stream only after the compute stream's last read of it. The staging slots' reuse is ordered
//! by events of our own ([`super::upload::StagingRing`] decides when to wait).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaStream, CudaViewMut, DeviceRepr, PinnedHostSlice,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Shape, Storage, Tensor};

use super::upload::{self, StagingBackend, StagingRing};
use crate::checkpoint::store::TensorStore;
use crate::error::{Error, Result};

/// Staging slots per device and their size: two slots let the host fill one while the device
/// copies the other; 64 MiB each keeps the driver's per-copy overhead small against a 150 MiB
/// FLUX block, at 128 MiB of pinned host memory.
pub const STAGING_SLOTS: usize = 2;
pub const STAGING_SLOT_BYTES: usize = 64 << 20;

fn driver(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("CUDA {what}: {e}"))
}

/// Opens CUDA device `ordinal` with an explicit compute stream, and keeps freed memory in the
/// driver's pool (a streamed plan frees and allocates a block's worth every step).
pub fn open(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda_with_stream(ordinal).map_err(|e| {
        // The driver's words, without the backtrace candle attaches under RUST_BACKTRACE.
        let e = match e {
            candle_core::Error::WithBacktrace { inner, .. } => *inner,
            e => e,
        };
        Error::Config(format!(
            "no CUDA device {ordinal} ({e}): check `nvidia-smi`, or run with --device cpu"
        ))
    })?;
    let cuda = cuda_of(&device)?;
    let pool = default_pool(&cuda)?;
    let mut keep = u64::MAX;
    // SAFETY: a valid pool and a u64 value, as the attribute takes.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut keep as *mut u64 as *mut c_void,
        )
        .result()
        .map_err(|e| driver("memory pool", e))?;
    }
    Ok(device)
}

fn cuda_of(device: &Device) -> Result<CudaDevice> {
    match device {
        Device::Cuda(c) => Ok(c.clone()),
        _ => Err(Error::Config("not a CUDA device".into())),
    }
}

fn default_pool(cuda: &CudaDevice) -> Result<sys::CUmemoryPool> {
    let ctx = cuda.cuda_stream().context().clone();
    ctx.bind_to_thread().map_err(|e| driver("context", e))?;
    let mut pool = std::ptr::null_mut();
    // SAFETY: writes one handle for a device of this context.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(|e| driver("memory pool", e))?;
    }
    Ok(pool)
}

/// The driver's account of the memory candle's tensors take (all of them come from the
/// device's default pool, through stream-ordered allocation).
#[derive(Debug, Clone)]
pub struct PoolMeter {
    cuda: CudaDevice,
}

impl PoolMeter {
    pub fn new(device: &Device) -> Result<Self> {
        Ok(Self {
            cuda: cuda_of(device)?,
        })
    }

    fn attribute(&self, attr: sys::CUmemPool_attribute) -> Result<u64> {
        let pool = default_pool(&self.cuda)?;
        let mut v: u64 = 0;
        // SAFETY: the used/reserved attributes are u64 values.
        unsafe {
            sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut c_void)
                .result()
                .map_err(|e| driver("memory pool", e))?;
        }
        Ok(v)
    }

    /// Bytes in use now.
    pub fn current(&self) -> usize {
        self.attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
            .unwrap_or(0) as usize
    }

    /// Most bytes in use since the last [`PoolMeter::reset_peak`]. Waits for the compute stream
    /// first, so that the kernels issued so far have allocated what they allocate.
    pub fn peak(&self) -> usize {
        let _ = self.cuda.cuda_stream().synchronize();
        self.attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
            .unwrap_or(0) as usize
    }

    /// Starts a new high-water mark from what is in use now.
    pub fn reset_peak(&self) {
        let _ = self.cuda.cuda_stream().synchronize();
        if let Ok(pool) = default_pool(&self.cuda) {
            let mut zero: u64 = 0;
            // SAFETY: resetting the high mark takes a u64 zero.
            unsafe {
                let _ = sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut zero as *mut u64 as *mut c_void,
                );
            }
        }
    }
}

/// A pinned slot and the event of its last copy.
struct Slot {
    host: PinnedHostSlice<u8>,
    ptr: *mut u8,
    done: Option<CudaEvent>,
}

// SAFETY: the pointer is the slot's own pinned allocation, used under the uploader's lock.
unsafe impl Send for Slot {}

struct Ring {
    ring: StagingRing,
    slots: Vec<Slot>,
}

/// Uploads to one device on its copy stream (one per device, shared by every residency).
pub struct CudaUploader {
    cuda: CudaDevice,
    copy: Arc<CudaStream>,
    ring: Mutex<Ring>,
}

impl std::fmt::Debug for CudaUploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaUploader").finish_non_exhaustive()
    }
}

/// The copy into one destination buffer, through the device's ring.
struct Copy<'a, 'b> {
    slots: &'a mut [Slot],
    copy: &'a Arc<CudaStream>,
    dst: CudaViewMut<'b, u8>,
}

impl StagingBackend for Copy<'_, '_> {
    fn wait_slot(&mut self, slot: usize) -> Result<()> {
        if let Some(e) = self.slots[slot].done.take() {
            e.synchronize().map_err(|e| driver("staging wait", e))?;
        }
        Ok(())
    }

    fn fill(&mut self, slot: usize, src: &[u8]) -> Result<()> {
        let s = &mut self.slots[slot];
        // SAFETY: the slot is at least a chunk long (the ring cuts chunks to the slot size) and
        // no copy reads it now (the ring waited for its last one).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), s.ptr, src.len()) };
        Ok(())
    }

    fn copy(&mut self, slot: usize, len: usize, dst_offset: usize) -> Result<()> {
        let s = &mut self.slots[slot];
        // SAFETY: pinned memory of at least `len` bytes that stays alive (the slot outlives
        // the copy: it is waited for before reuse and before the uploader is dropped).
        let src = unsafe { std::slice::from_raw_parts(s.ptr as *const u8, len) };
        let mut dst = self.dst.slice_mut(dst_offset..dst_offset + len);
        self.copy
            .memcpy_htod(src, &mut dst)
            .map_err(|e| driver("upload", e))?;
        s.done = Some(
            self.copy
                .record_event(None)
                .map_err(|e| driver("upload event", e))?,
        );
        Ok(())
    }
}

impl CudaUploader {
    /// The uploader of `device`'s context, made on first use; `None` on other devices.
    pub fn for_device(device: &Device) -> Result<Option<Arc<Self>>> {
        static UPLOADERS: OnceLock<Mutex<HashMap<usize, Arc<CudaUploader>>>> = OnceLock::new();
        let Device::Cuda(cuda) = device else {
            return Ok(None);
        };
        let key = Arc::as_ptr(cuda.cuda_stream().context()) as usize;
        let mut map = UPLOADERS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(u) = map.get(&key) {
            return Ok(Some(u.clone()));
        }
        let u = Arc::new(Self::new(cuda.clone(), STAGING_SLOTS, STAGING_SLOT_BYTES)?);
        map.insert(key, u.clone());
        Ok(Some(u))
    }

    fn new(cuda: CudaDevice, slots: usize, slot_bytes: usize) -> Result<Self> {
        let ctx: Arc<CudaContext> = cuda.cuda_stream().context().clone();
        let copy = ctx.new_stream().map_err(|e| driver("copy stream", e))?;
        let slots = (0..slots)
            .map(|_| {
                // SAFETY: the slot is written before any copy reads it.
                let mut host = unsafe { ctx.alloc_pinned::<u8>(slot_bytes) }
                    .map_err(|e| driver("pinned staging memory", e))?;
                let ptr = host
                    .as_mut_ptr()
                    .map_err(|e| driver("pinned staging memory", e))?;
                Ok(Slot {
                    host,
                    ptr,
                    done: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cuda,
            copy,
            ring: Mutex::new(Ring {
                ring: StagingRing::new(slots.len(), slot_bytes),
                slots,
            }),
        })
    }

    /// Pinned staging memory held on the host.
    pub fn staging_bytes(&self) -> usize {
        let r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        r.slots.iter().map(|s| s.host.num_bytes()).sum()
    }

    /// A tensor of `dtype` and `shape` on the device, made of `bytes` (its elements in
    /// row-major order), copied on the copy stream. Returns once the copies are issued; the
    /// compute stream waits for them before it first reads the tensor.
    pub fn upload(&self, bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let shape = Shape::from(shape);
        if bytes.len() != shape.elem_count() * dtype.size_in_bytes() {
            return Err(Error::Config(format!(
                "upload of {} bytes for a {dtype:?} tensor of shape {:?}",
                bytes.len(),
                shape.dims()
            )));
        }
        let n = shape.elem_count();
        let storage = match dtype {
            DType::BF16 => self.upload_typed::<half::bf16>(bytes, n)?,
            DType::F16 => self.upload_typed::<half::f16>(bytes, n)?,
            DType::F32 => self.upload_typed::<f32>(bytes, n)?,
            DType::U8 => self.upload_typed::<u8>(bytes, n)?,
            other => {
                return Err(Error::Config(format!(
                    "CUDA upload of {other:?} tensors is not supported"
                )))
            }
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            shape,
            BackpropOp::none(),
            false,
        ))
    }

    /// A device buffer of `n` elements allocated on the copy stream and filled through the ring.
    fn upload_typed<T: CudaDType + DeviceRepr>(
        &self,
        bytes: &[u8],
        n: usize,
    ) -> Result<CudaStorage> {
        // SAFETY: every byte is written by the copies below before any kernel reads it.
        let mut out =
            unsafe { self.copy.alloc::<T>(n.max(1)) }.map_err(|e| driver("allocation", e))?;
        {
            // SAFETY: a byte view of plain numeric data, no longer than the buffer.
            let dst = unsafe { out.transmute_mut::<u8>(bytes.len()) }
                .ok_or_else(|| Error::Config("CUDA upload: buffer size".into()))?;
            let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            let Ring { ring, slots } = &mut *r;
            let mut backend = Copy {
                slots,
                copy: &self.copy,
                dst,
            };
            upload::upload(ring, &mut backend, bytes)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, self.cuda.clone()))
    }

    /// Materialises `key` of `store` on the device in `dtype`: stored bytes of that dtype go
    /// straight from the memory map to a staging slot; anything else is built on the host
    /// (recipes, dtype conversion) and its bytes uploaded.
    pub fn load(&self, store: &TensorStore, key: &str, dtype: DType) -> Result<Tensor> {
        if let Some(d) = store.direct_bytes(key)? {
            if d.dtype == dtype {
                return self.upload(d.bytes, dtype, &d.shape);
            }
        }
        let host = store.load(key, &Device::Cpu, dtype)?.contiguous()?;
        let shape = host.dims().to_vec();
        with_host_bytes(&host, |b| self.upload(b, dtype, &shape))
    }
}

impl Drop for CudaUploader {
    fn drop(&mut self) {
        // The slots' memory must outlive their copies.
        let _ = self.copy.synchronize();
    }
}

/// Runs `f` over the bytes of a contiguous CPU tensor.
fn with_host_bytes<R>(t: &Tensor, f: impl FnOnce(&[u8]) -> Result<R>) -> Result<R> {
    use candle_core::CpuStorage as C;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Config(
            "host bytes of a tensor not on the host".into(),
        ));
    };
    fn raw<T>(v: &[T]) -> &[u8] {
        // SAFETY: plain numeric data viewed as bytes.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }
    let start = layout.start_offset();
    let n = layout.shape().elem_count();
    let bytes = match cpu {
        C::BF16(v) => raw(&v[start..start + n]),
        C::F16(v) => raw(&v[start..start + n]),
        C::F32(v) => raw(&v[start..start + n]),
        C::U8(v) => raw(&v[start..start + n]),
        _ => {
            return Err(Error::Config(format!(
                "CUDA upload of {:?} tensors",
                t.dtype()
            )))
        }
    };
    f(bytes)
}
