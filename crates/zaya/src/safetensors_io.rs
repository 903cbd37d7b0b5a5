//! Safetensors files read and written one tensor at a time, so that an 8B checkpoint never
//! has to exist in memory as a whole (or twice).
//!
//! Reading: only the JSON header of each file is parsed up front ([`read_header`]); a
//! tensor's bytes are later read with one positioned read straight into the buffer that
//! becomes the candle tensor ([`read_exact_at`]). No memory map stays alive, so the resident
//! memory of a loaded model is its weight bytes, not weights plus mapped file pages.
//!
//! Writing: [`write_sharded`] plans the files from the tensor list (names, dtypes, shapes),
//! writes each header first and then streams the data through a callback, into
//! `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` as
//! transformers does (a single `model.safetensors` when everything fits in one shard).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use half::{bf16, f16};

use crate::error::{Result, ZayaError};

/// Largest shard [`write_sharded`] writes by default (transformers' `max_shard_size="5GB"`).
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// Where one tensor's bytes lie in a safetensors file.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute offset of the first byte in the file.
    pub offset: u64,
    pub len: u64,
}

fn bad(path: &Path, message: impl Into<String>) -> ZayaError {
    ZayaError::BadWeightsFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn dtype_from_str(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F64" => DType::F64,
        // integer state such as AdamW's step counts (never weights: see `Checkpoint::open`)
        "I64" => DType::I64,
        _ => return None,
    })
}

fn dtype_str(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F64 => "F64",
        other => {
            return Err(ZayaError::Input(format!(
                "cannot store dtype {other:?} in a checkpoint"
            )))
        }
    })
}

/// The safetensors crate's dtype of `dtype` (I64 too: AdamW's step counts).
fn st_dtype(dtype: DType) -> Result<safetensors::Dtype> {
    Ok(match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        DType::F64 => safetensors::Dtype::F64,
        DType::I64 => safetensors::Dtype::I64,
        other => {
            return Err(ZayaError::Input(format!(
                "cannot store dtype {other:?} in a safetensors file"
            )))
        }
    })
}

/// Parses the header of a safetensors file and checks every tensor's byte range against its
/// dtype, shape and the file size (a truncated file fails here, naming the tensor).
pub fn read_header(path: &Path) -> Result<Vec<StoredTensor>> {
    let mut f = File::open(path).map_err(|e| ZayaError::io(path, e))?;
    let file_len = f.metadata().map_err(|e| ZayaError::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad(path, "shorter than the 8-byte header length"))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(bad(
            path,
            format!("header length {header_len} does not fit the file of {file_len} bytes"),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)
        .map_err(|e| bad(path, format!("reading the header: {e}")))?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| bad(path, format!("header is not JSON: {e}")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| bad(path, "header is not a JSON object"))?;
    let data_start = 8 + header_len;
    let mut out = Vec::with_capacity(obj.len());
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| bad(path, format!("tensor `{name}`: no `{k}` in the header")))
        };
        let dtype_s = field("dtype")?.as_str().unwrap_or("?");
        let dtype = dtype_from_str(dtype_s).ok_or_else(|| ZayaError::UnsupportedDtype {
            name: name.clone(),
            dtype: dtype_s.to_string(),
            file: path.to_path_buf(),
        })?;
        let ints = |k: &str| -> Result<Vec<u64>> {
            field(k)?
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64()).collect::<Option<Vec<_>>>())
                .ok_or_else(|| {
                    bad(
                        path,
                        format!("tensor `{name}`: `{k}` is not a list of integers"),
                    )
                })
        };
        let shape: Vec<usize> = ints("shape")?.into_iter().map(|x| x as usize).collect();
        let offs = ints("data_offsets")?;
        let [begin, end] = offs[..] else {
            return Err(bad(
                path,
                format!("tensor `{name}`: data_offsets must hold two integers"),
            ));
        };
        // Checked: a hostile header can name dimensions whose product overflows.
        let want = shape
            .iter()
            .try_fold(dtype.size_in_bytes() as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            })
            .ok_or_else(|| {
                bad(
                    path,
                    format!("tensor `{name}`: shape {shape:?} in {dtype_s} overflows a byte count"),
                )
            })?;
        if end < begin || end - begin != want {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}`: data_offsets [{begin}, {end}] hold {} bytes, but shape \
                     {shape:?} in {dtype_s} needs {want}",
                    end.saturating_sub(begin)
                ),
            ));
        }
        if data_start
            .checked_add(end)
            .is_none_or(|stop| stop > file_len)
        {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}`: bytes [{}, {}) lie past the end of the file ({file_len} \
                     bytes): the file is truncated",
                    data_start.saturating_add(begin),
                    data_start.saturating_add(end)
                ),
            ));
        }
        out.push(StoredTensor {
            name: name.clone(),
            dtype,
            shape,
            offset: data_start + begin,
            len: want,
        });
    }
    Ok(out)
}

/// Reads exactly `dst.len()` bytes at `offset`.
pub fn read_exact_at(file: &File, path: &Path, offset: u64, dst: &mut [u8]) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(dst, offset)
            .map_err(|e| ZayaError::io(path, e))
    }
    #[cfg(not(unix))]
    {
        use std::io::{Seek, SeekFrom};
        let mut f = file;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| ZayaError::io(path, e))?;
        f.read_exact(dst).map_err(|e| ZayaError::io(path, e))
    }
}

/// Bytes one read of [`read_exact_at_parallel`] covers.
const READ_CHUNK: usize = 16 << 20;

/// [`read_exact_at`] in chunks of [`READ_CHUNK`] bytes read concurrently on the rayon pool.
/// A weight's bytes go into fresh pages, and the first write to a fresh page is most of a
/// load's time on a virtual machine: the host provisions the page then. On the project's
/// VM a first touch ran at ~0.45 GB/s on one thread and ~0.9 GB/s on two, where memory
/// touched again seconds later ran at 7–15 GB/s; two readers halve that wait.
///
/// With `release_cache` each chunk's pages are then dropped from the page cache
/// (`posix_fadvise(DONTNEED)`): for a file that cannot stay cached beside its copy anyway.
///
/// Elsewhere than on Unix [`read_exact_at`] seeks the shared handle before reading, so the
/// chunks are read one after the other there.
pub fn read_exact_at_parallel(
    file: &File,
    path: &Path,
    offset: u64,
    dst: &mut [u8],
    release_cache: bool,
) -> Result<()> {
    use rayon::prelude::*;
    if !cfg!(unix) {
        return read_exact_at(file, path, offset, dst);
    }
    dst.par_chunks_mut(READ_CHUNK)
        .enumerate()
        .try_for_each(|(i, chunk)| {
            let at = offset + (i * READ_CHUNK) as u64;
            read_exact_at(file, path, at, chunk)?;
            if release_cache {
                release_cached(file, at, chunk.len());
            }
            Ok(())
        })
}

/// Asks the kernel to drop the page cache's copy of `len` bytes at `offset` of `file`
/// (`POSIX_FADV_DONTNEED`; a hint: clean pages go, nothing else changes), once they have
/// been read into their final place. Loading a model whose files and their copy do not
/// both fit in memory otherwise fills memory with a second, cached copy, whose fresh pages
/// the VM provisions as it does the copy's, and which the kernel then reclaims page by page
/// to make room. The 8B in bf16 (17.7 GB, 23 GB available), `zaya generate` from a cold
/// cache, seven alternated pairs on the project's Xeon: loaded in 14.2–16.3 s (median
/// 14.9) without this, 9.9–14.3 s (median 11.4) with it (the first run after a build was
/// slower either way, 31.6 and 27.5 s: the VM provisioning again the memory the compiler
/// had just freed).
pub(crate) fn release_cached(file: &File, offset: u64, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a hint about a byte range of an open file descriptor; it changes no data
        // and no memory of this process.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// `src` copied into `dst` (same length) in chunks of [`READ_CHUNK`] bytes on the rayon
/// pool: a memory-mapped tensor copied into fresh pages, which the first write provisions
/// (see [`read_exact_at_parallel`]).
pub(crate) fn copy_parallel(src: &[u8], dst: &mut [u8]) -> Result<()> {
    use rayon::prelude::*;
    if src.len() != dst.len() {
        return Err(ZayaError::Input(format!(
            "copying {} bytes into a buffer of {}",
            src.len(),
            dst.len()
        )));
    }
    dst.par_chunks_mut(READ_CHUNK)
        .zip(src.par_chunks(READ_CHUNK))
        .for_each(|(d, s)| d.copy_from_slice(s));
    Ok(())
}

/// `n` values of `T` with all bits zero, in a fresh zeroed allocation. `vec![bf16::ZERO; n]`
/// writes every element (std knows only its own primitives to be zero bits); a zeroed
/// allocation of this size is fresh zero pages with no pass over them, so the first write
/// to each page is the read that fills it.
///
/// # Safety
/// All-zero bits must be a valid value of `T` (numbers, and plain blocks of them).
pub(crate) unsafe fn zeroed<T>(n: usize) -> Result<Vec<T>> {
    let layout = std::alloc::Layout::array::<T>(n)
        .map_err(|_| ZayaError::Input(format!("a buffer of {n} values does not fit in memory")))?;
    if layout.size() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: `layout` has a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if p.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `p` was allocated by the global allocator with `Layout::array::<T>(n)` and
    // holds `n` values of `T` whose bits are all zero, a valid `T` (the caller's promise).
    Ok(unsafe { Vec::from_raw_parts(p, n, n) })
}

/// The bytes of `v`'s values, to fill them.
///
/// # Safety
/// Every bit pattern must be a valid value of `T` (numbers, and plain blocks of them
/// without padding).
pub(crate) unsafe fn bytes_mut<T>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: the view covers exactly the slice's initialised values; any bytes written
    // through it form valid values (the caller's promise).
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A buffer of `numel` elements of `dtype`, filled by `fill` through its bytes, returned as a
/// candle tensor of `shape` without another copy.
pub fn tensor_from_bytes(
    dtype: DType,
    shape: &[usize],
    fill: impl FnOnce(&mut [u8]) -> Result<()>,
) -> Result<Tensor> {
    fn typed<T: candle_core::WithDType + Copy>(
        shape: &[usize],
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        // SAFETY (both): T is a plain numeric type (f32, f64, bf16, f16, i64), valid for
        // every bit pattern, zeros included.
        let mut v: Vec<T> = unsafe { zeroed(n) }?;
        fill(unsafe { bytes_mut(&mut v) })?;
        if cfg!(target_endian = "big") {
            return Err(ZayaError::Input(
                "safetensors data is little-endian; big-endian hosts are not supported".into(),
            ));
        }
        Ok(Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?)
    }
    match dtype {
        DType::F32 => typed::<f32>(shape, fill),
        DType::F64 => typed::<f64>(shape, fill),
        DType::BF16 => typed::<bf16>(shape, fill),
        DType::F16 => typed::<f16>(shape, fill),
        DType::I64 => typed::<i64>(shape, fill),
        other => Err(ZayaError::Input(format!(
            "cannot load dtype {other:?} from a checkpoint"
        ))),
    }
}

/// The raw little-endian bytes of a float tensor (any layout), in logical order.
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    fn raw<T: Copy>(v: Vec<T>) -> Vec<u8> {
        let n = v.len() * std::mem::size_of::<T>();
        let mut out = vec![0u8; n];
        // SAFETY: plain float values copied byte for byte into a buffer of the same size.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr() as *const u8, out.as_mut_ptr(), n) };
        out
    }
    Ok(match t.dtype() {
        DType::F32 => raw(t.to_vec1::<f32>()?),
        DType::F64 => raw(t.to_vec1::<f64>()?),
        DType::BF16 => raw(t.to_vec1::<bf16>()?),
        DType::F16 => raw(t.to_vec1::<f16>()?),
        DType::I64 => raw(t.to_vec1::<i64>()?),
        other => {
            return Err(ZayaError::Input(format!(
                "cannot store dtype {other:?} in a checkpoint"
            )))
        }
    })
}

/// One tensor a writer will emit.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size_in_bytes() as u64
    }
}

/// Receives one tensor's data during [`write_sharded`]; checks that exactly the planned
/// number of bytes arrives.
pub struct TensorSink<'a> {
    out: &'a mut BufWriter<File>,
    path: &'a Path,
    written: u64,
}

impl TensorSink<'_> {
    /// Appends raw little-endian bytes of the tensor.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| ZayaError::io(self.path, e))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Appends i64 values (AdamW's step counts).
    pub fn write_i64(&mut self, values: &[i64]) -> Result<()> {
        let buf: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.write_bytes(&buf)
    }

    /// Appends f32 values rounded to `dtype`.
    pub fn write_f32_as(&mut self, values: &[f32], dtype: DType) -> Result<()> {
        let mut buf = Vec::with_capacity(values.len() * dtype.size_in_bytes());
        match dtype {
            DType::F32 => values
                .iter()
                .for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
            DType::BF16 => values
                .iter()
                .for_each(|v| buf.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
            DType::F16 => values
                .iter()
                .for_each(|v| buf.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            DType::F64 => values
                .iter()
                .for_each(|v| buf.extend_from_slice(&(*v as f64).to_le_bytes())),
            other => {
                return Err(ZayaError::Input(format!(
                    "cannot store dtype {other:?} in a checkpoint"
                )))
            }
        }
        self.write_bytes(&buf)
    }
}

/// The order in which `safetensors::serialize_to_file` (and so `save_checkpoint`,
/// `candle_core::safetensors::save`) lays out `tensors`: by descending dtype alignment,
/// then by name. A distributed writer walks the tensors in this order on every rank.
pub fn file_order(tensors: &[PlannedTensor]) -> Result<Vec<PlannedTensor>> {
    let mut keyed = tensors
        .iter()
        .map(|t| Ok((st_dtype(t.dtype)?, t.clone())))
        .collect::<Result<Vec<_>>>()?;
    keyed.sort_by(|(ld, l), (rd, r)| rd.cmp(ld).then(l.name.cmp(&r.name)));
    Ok(keyed.into_iter().map(|(_, t)| t).collect())
}

/// Writes `tensors` as one safetensors file at `path`, byte for byte what
/// `safetensors::serialize_to_file(tensors, metadata, ..)` writes for the same tensors
/// (order of [`file_order`], the same header), but streaming: the header first, then
/// `fill(tensor, sink)` once per tensor in file order, so only what `fill` holds is in
/// memory. The file is written as `tmp`, synced and renamed to `path` (a crash leaves the
/// old file or none, never a partial one).
pub fn write_file_streamed(
    path: &Path,
    tmp: &Path,
    tensors: &[PlannedTensor],
    metadata: Option<std::collections::HashMap<String, String>>,
    mut fill: impl FnMut(&PlannedTensor, &mut TensorSink) -> Result<()>,
) -> Result<()> {
    let ordered = file_order(tensors)?;
    let mut infos = Vec::with_capacity(ordered.len());
    let mut off = 0usize;
    for t in &ordered {
        let n = t.bytes() as usize;
        infos.push((
            t.name.clone(),
            safetensors::tensor::TensorInfo {
                dtype: st_dtype(t.dtype)?,
                shape: t.shape.clone(),
                data_offsets: (off, off + n),
            },
        ));
        off += n;
    }
    let header = safetensors::tensor::Metadata::new(metadata, infos)
        .map_err(|e| bad(path, format!("planning the header: {e}")))?;
    let mut h = serde_json::to_vec(&header)
        .map_err(|e| bad(path, format!("serialising the header: {e}")))?;
    // the safetensors writer pads the header to 8 bytes with spaces
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let file = File::create(tmp).map_err(|e| ZayaError::io(tmp, e))?;
    let mut out = BufWriter::with_capacity(8 << 20, file);
    out.write_all(&(h.len() as u64).to_le_bytes())
        .and_then(|()| out.write_all(&h))
        .map_err(|e| ZayaError::io(tmp, e))?;
    for t in &ordered {
        let mut sink = TensorSink {
            out: &mut out,
            path: tmp,
            written: 0,
        };
        fill(t, &mut sink)?;
        if sink.written != t.bytes() {
            return Err(ZayaError::Input(format!(
                "tensor `{}`: {} bytes were written, its dtype and shape {:?} need {}",
                t.name,
                sink.written,
                t.shape,
                t.bytes()
            )));
        }
    }
    out.flush().map_err(|e| ZayaError::io(tmp, e))?;
    drop(out);
    crate::durable::rename_synced(tmp, path)
}

/// The header of one file holding `tensors` back to back (padded to 8 bytes as the
/// safetensors writers do).
fn header_bytes(tensors: &[&PlannedTensor]) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut off = 0u64;
    for t in tensors {
        map.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": dtype_str(t.dtype)?,
                "shape": t.shape,
                "data_offsets": [off, off + t.bytes()],
            }),
        );
        off += t.bytes();
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(map)).expect("header serialises");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    Ok(out)
}

/// Splits `tensors` (in order) into shards of at most `max_shard_bytes` (a tensor larger
/// than that gets a shard of its own).
fn plan_shards(tensors: &[PlannedTensor], max_shard_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![];
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        match shards.last_mut() {
            Some(cur) if size + t.bytes() <= max_shard_bytes => {
                cur.push(i);
                size += t.bytes();
            }
            _ => {
                shards.push(vec![i]);
                size = t.bytes();
            }
        }
    }
    shards
}

/// Writes `tensors` into `dir` as safetensors shards of at most `max_shard_bytes` each (plus
/// the index when there is more than one), calling `fill(i, tensor, sink)` once per tensor in
/// order to stream its data. Files appear under temporary names and are renamed once
/// complete. Returns the weight files written.
pub fn write_sharded(
    dir: &Path,
    tensors: &[PlannedTensor],
    max_shard_bytes: u64,
    mut fill: impl FnMut(usize, &PlannedTensor, &mut TensorSink) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| ZayaError::io(dir, e))?;
    let shards = plan_shards(tensors, max_shard_bytes.max(1));
    let n = shards.len();
    let names: Vec<String> = if n <= 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    };
    let index_path = dir.join("model.safetensors.index.json");
    let mut weight_map = serde_json::Map::new();
    let mut written = vec![];
    for (shard, file_name) in shards.iter().zip(&names) {
        let path = dir.join(file_name);
        let tmp = dir.join(format!(".{file_name}.tmp"));
        let planned: Vec<&PlannedTensor> = shard.iter().map(|&i| &tensors[i]).collect();
        let file = File::create(&tmp).map_err(|e| ZayaError::io(&tmp, e))?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        out.write_all(&header_bytes(&planned)?)
            .map_err(|e| ZayaError::io(&tmp, e))?;
        for &i in shard {
            let t = &tensors[i];
            let mut sink = TensorSink {
                out: &mut out,
                path: &tmp,
                written: 0,
            };
            fill(i, t, &mut sink)?;
            if sink.written != t.bytes() {
                return Err(ZayaError::Input(format!(
                    "tensor `{}`: {} bytes were written, its dtype and shape {:?} need {}",
                    t.name,
                    sink.written,
                    t.shape,
                    t.bytes()
                )));
            }
            weight_map.insert(t.name.clone(), serde_json::Value::from(file_name.clone()));
        }
        out.flush().map_err(|e| ZayaError::io(&tmp, e))?;
        drop(out);
        std::fs::rename(&tmp, &path).map_err(|e| ZayaError::io(&path, e))?;
        written.push(path);
    }
    if n > 1 {
        let total: u64 = tensors.iter().map(PlannedTensor::bytes).sum();
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&index).expect("index serialises");
        crate::weights::write_atomic(&index_path, text.as_bytes())?;
    } else if index_path.exists() {
        // A stale index from an earlier sharded write would shadow the new single file.
        std::fs::remove_file(&index_path).map_err(|e| ZayaError::io(&index_path, e))?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(name: &str, n: usize) -> PlannedTensor {
        PlannedTensor {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![n],
        }
    }

    #[test]
    fn shards_split_at_the_limit_and_oversized_tensors_stand_alone() {
        let t = [
            planned("a", 2),
            planned("b", 2),
            planned("c", 10),
            planned("d", 1),
        ];
        // 8-byte tensors a, b fit 16 bytes together; c (40 bytes) is alone; d starts anew.
        assert_eq!(plan_shards(&t, 16), vec![vec![0, 1], vec![2], vec![3]]);
        assert_eq!(plan_shards(&t, 1 << 20), vec![vec![0, 1, 2, 3]]);
    }

    #[test]
    fn written_shards_read_back_and_a_short_fill_is_an_error() {
        let dir = std::env::temp_dir().join(format!("zaya-st-io-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t = vec![planned("x", 3), planned("y", 5)];
        let files = write_sharded(&dir, &t, 16, |i, p, sink| {
            let vals: Vec<f32> = (0..p.shape[0]).map(|j| (10 * i + j) as f32).collect();
            sink.write_f32_as(&vals, DType::F32)
        })
        .unwrap();
        assert_eq!(files.len(), 2);
        assert!(dir.join("model.safetensors.index.json").exists());
        let h = read_header(&files[1]).unwrap();
        assert_eq!(h[0].name, "y");
        let file = File::open(&files[1]).unwrap();
        let y = tensor_from_bytes(DType::F32, &[5], |b| {
            read_exact_at(&file, &files[1], h[0].offset, b)
        })
        .unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![10., 11., 12., 13., 14.]);
        // the file is also valid for the safetensors crate
        let bytes = std::fs::read(&files[0]).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("x").unwrap().shape(), &[3]);

        let err =
            write_sharded(&dir, &t, 1 << 20, |_, _, sink| sink.write_bytes(&[0u8; 4])).unwrap_err();
        assert!(err.to_string().contains("tensor `x`"), "{err}");

        // truncation is caught from the header, naming the tensor
        let f = &files[1];
        let len = std::fs::metadata(f).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
        file.set_len(len - 4).unwrap();
        let err = read_header(f).unwrap_err().to_string();
        assert!(err.contains("`y`") && err.contains("truncated"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parallel_reads_cover_every_chunk_in_order() {
        // two whole chunks and a partial one, read from an odd offset, on two threads
        let path = std::env::temp_dir().join(format!("zaya-par-read-{}", std::process::id()));
        let len = 2 * READ_CHUNK + 4099;
        let data: Vec<u8> = (0..len + 7).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut got = vec![0u8; len];
        pool.install(|| read_exact_at_parallel(&file, &path, 7, &mut got, false))
            .unwrap();
        assert!(got == data[7..], "chunks out of place");
        // the same with each chunk dropped from the page cache after it is read
        let mut again = vec![0u8; len];
        pool.install(|| read_exact_at_parallel(&file, &path, 7, &mut again, true))
            .unwrap();
        assert!(
            again == data[7..],
            "chunks out of place (page cache released)"
        );
        // past the end of the file: an error naming it, whichever chunk hits it
        let mut long = vec![0u8; len + 8];
        let err = pool
            .install(|| read_exact_at_parallel(&file, &path, 7, &mut long, true))
            .unwrap_err()
            .to_string();
        assert!(err.contains("zaya-par-read"), "{err}");
        std::fs::remove_file(&path).unwrap();
        // the same for a copy out of memory (a mapped GGUF tensor), and lengths must agree
        let mut copy = vec![0u8; len];
        pool.install(|| copy_parallel(&data[7..], &mut copy))
            .unwrap();
        assert!(copy == data[7..], "copied chunks out of place");
        let err = copy_parallel(&data, &mut copy).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{} bytes into a buffer of {len}", len + 7)),
            "{err}"
        );
        // the buffers a read fills start as zeros of every stored dtype
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16, DType::I64] {
            let t = tensor_from_bytes(dtype, &[3, 5], |_| Ok(())).unwrap();
            let sum = t
                .to_dtype(DType::F64)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap();
            assert_eq!(sum.to_scalar::<f64>().unwrap(), 0.0, "{dtype:?}");
            assert_eq!(t.dims(), &[3, 5]);
        }
        let empty = tensor_from_bytes(DType::BF16, &[0, 4], |b| {
            assert!(b.is_empty());
            Ok(())
        })
        .unwrap();
        assert_eq!(empty.elem_count(), 0);
    }
}
