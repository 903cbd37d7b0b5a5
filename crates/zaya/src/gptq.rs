//! GPTQ rounding (Frantar et al., 2022) inside the GGUF block formats: the quantized
//! levels of a weight are chosen one input feature at a time, each rounding error pushed
//! onto the features not yet rounded in proportion to how the calibration text's inputs
//! correlate with it, so that the layer's *outputs* `x · Wᵀ` stay close, not each weight.
//!
//! The grid stays the format's own: the block scales (and minima) are those the plain (or
//! importance-weighted) quantizer chose from the original weights — "static groups" —, so
//! the file is an ordinary GGUF that any reader decodes, and only the levels differ. The
//! features go in order of decreasing input energy (`act_order`); the statistics are the
//! inputs' second moments `H = XᵀX / n` of every linear layer, per expert for the stacked
//! experts, collected through the weight seam ([`HessianCollector`] as the model's
//! [`InputObserver`]).
//!
//! Not applied to a tied embedding: its rows are also looked up, and GPTQ's compensation
//! only holds for the product with the final hidden state (measured on the default model:
//! q8_0 KL 2.0e-3 → 6.0e-3 with it, against 2.0e-3 → 1.9e-3 without). A tied head stored
//! apart from its lookup ([`crate::quant::QuantPlan::splits_tied_head`]) is a product only,
//! and GPTQ rounds it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};

use crate::config::ZayaConfig;
use crate::error::{Result, ZayaError};
use crate::model::InputObserver;
use crate::weights::native_specs;

/// Damping added to `H`'s diagonal, as a fraction of its mean (GPTQ's `percdamp`).
pub const DAMP: f64 = 0.01;

/// Rows rounded together (one pass over `U` per tile).
const TILE: usize = 64;

/// Features of a tile rounded one after another before their errors reach the features
/// after them, all at once in one product (GPTQ's "lazy batch" updates).
const BATCH: usize = 32;

/// Fewest calibration rows per input feature for GPTQ to round a matrix: below, `H` is
/// singular (an expert few tokens reached) and the compensation would follow directions
/// the text never exercised; such a matrix keeps the plain rounding.
pub const MIN_ROWS_PER_FEATURE: u64 = 1;

/// Second moments of one weight's inputs: `Σ xᵀx` over every row the matrix multiplied.
#[derive(Debug, Clone, PartialEq)]
pub struct Hessian {
    /// Input features (`cols × cols` sums).
    pub cols: usize,
    /// Rows seen.
    pub rows: u64,
    /// Row-major `Σ xᵀx`.
    pub sums: Vec<f64>,
}

/// Per native tensor name, one entry per matrix (one for a plain weight, `E` for a stacked
/// expert tensor; `None` for an expert no calibration token reached).
pub type Hessians = BTreeMap<String, Vec<Option<Hessian>>>;

/// Whether GPTQ chooses the levels of `name`: every quantizable product except the token
/// embedding (see the module docs).
pub fn applies_to(name: &str) -> bool {
    name != crate::quant::EMBEDDING
}

/// The formats whose levels GPTQ can choose here (their grids are read and written by
/// [`grid`] and [`set_level`]).
pub fn supports(d: GgmlDType) -> bool {
    matches!(
        d,
        GgmlDType::Q8_0
            | GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
    )
}

/// The native tensors of `cfg` whose input moments a GPTQ run under `plan` wants: those the
/// plan stores in a format GPTQ handles, named as the calibrating model of `cfg` observes
/// them (a split tied head's input is observed as the embedding's,
/// [`crate::quant::QuantPlan::observed_as`]). GPTQ chooses the levels of all of them but a
/// tied token embedding ([`applies_to`]), whose moments' diagonal still weighs its block
/// scales as an importance matrix.
fn moments_for(plan: &crate::quant::QuantPlan, cfg: &ZayaConfig) -> BTreeSet<String> {
    stored_and_observed(plan, cfg)
        .into_iter()
        .map(|(_, observed)| observed)
        .collect()
}

/// Whether GPTQ chooses the levels of any tensor of `cfg` under `plan`.
pub fn rounds_any(plan: &crate::quant::QuantPlan, cfg: &ZayaConfig) -> bool {
    stored_and_observed(plan, cfg)
        .iter()
        .any(|(stored, _)| applies_to(stored))
}

/// Whether `plan` (resolved for the model) stores tensor `spec` in a format GPTQ handles.
fn in_gptq_format(plan: &crate::quant::QuantPlan, spec: &crate::weights::TensorSpec) -> bool {
    matches!(plan.format_for(&spec.name, &spec.shape),
        crate::quant::WeightFormat::Quant(d) if supports(d))
}

/// The tensors the file stores in a format GPTQ handles, each with the name its product's
/// input is observed under.
fn stored_and_observed(plan: &crate::quant::QuantPlan, cfg: &ZayaConfig) -> Vec<(String, String)> {
    let plan = plan.for_model(cfg);
    native_specs(&plan.stored_config(cfg))
        .into_iter()
        .filter(|s| in_gptq_format(&plan, s))
        .filter_map(|s| {
            let observed = plan.observed_as(cfg, &s.name)?.to_string();
            Some((s.name, observed))
        })
        .collect()
}

/// Calibration rows whose `xᵀx` are summed in f32 (by the product itself, accumulating)
/// before they join the f64 sums: the f64 read-modify-write of `cols²` sums once per window
/// and matrix was most of an 8B layer's calibration, and f32 partial sums over a few
/// thousand rows lose nothing GPTQ's 1 % damping would notice.
const FLUSH_ROWS: usize = 8192;

/// One matrix's sums while they are being collected.
struct Partial {
    cols: usize,
    rows: u64,
    sums: Vec<f64>,
    pending: Vec<f32>,
    pending_rows: usize,
}

impl Partial {
    fn flush(&mut self) {
        for (acc, p) in self.sums.iter_mut().zip(self.pending.iter_mut()) {
            *acc += f64::from(*p);
            *p = 0.0;
        }
        self.pending_rows = 0;
    }
}

/// Collects [`Hessians`] from an observed model for the tensors `wanted` accepts.
pub struct HessianCollector {
    wanted: Box<dyn Fn(&str) -> bool + Send + Sync>,
    sums: Mutex<BTreeMap<String, Vec<Option<Partial>>>>,
}

impl std::fmt::Debug for HessianCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HessianCollector").finish_non_exhaustive()
    }
}

impl HessianCollector {
    pub fn new(wanted: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self {
            wanted: Box::new(wanted),
            sums: Mutex::new(BTreeMap::new()),
        }
    }

    /// The sums collected so far.
    pub fn finish(self) -> Hessians {
        let all = self.sums.into_inner().unwrap_or_else(|p| p.into_inner());
        all.into_iter()
            .map(|(name, list)| {
                let list = list
                    .into_iter()
                    .map(|p| {
                        p.map(|mut p| {
                            p.flush();
                            Hessian {
                                cols: p.cols,
                                rows: p.rows,
                                sums: p.sums,
                            }
                        })
                    })
                    .collect();
                (name, list)
            })
            .collect()
    }
}

impl InputObserver for HessianCollector {
    fn wants(&self, name: &str) -> bool {
        (self.wanted)(name)
    }

    fn observe(&self, name: &str, expert: Option<usize>, x: &Tensor) -> candle_core::Result<()> {
        use crate::kernels::cpu::{gemm, MatMut, MatRef};
        if !(self.wanted)(name) {
            return Ok(());
        }
        let (rows, cols) = x.dims2()?;
        let x = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let m = expert.unwrap_or(0);
        let mut all = self.sums.lock().unwrap_or_else(|p| p.into_inner());
        let list = all.entry(name.to_string()).or_default();
        if list.len() <= m {
            list.resize_with(m + 1, || None);
        }
        let h = list[m].get_or_insert_with(|| Partial {
            cols,
            rows: 0,
            sums: vec![0.0; cols * cols],
            pending: vec![0.0; cols * cols],
            pending_rows: 0,
        });
        if h.cols != cols {
            candle_core::bail!(
                "`{name}` was observed with {cols} input features, earlier with {}",
                h.cols
            );
        }
        // pending += xᵀx (the product accumulates into the f32 partial sums)
        gemm(
            cols,
            cols,
            rows,
            MatMut::new(&mut h.pending, 0, cols),
            true,
            MatRef::rows(&x, 0, cols).t(),
            MatRef::rows(&x, 0, cols),
            1.0,
            true,
        )
        .map_err(candle_core::Error::wrap)?;
        h.rows += rows as u64;
        h.pending_rows += rows;
        if h.pending_rows >= FLUSH_ROWS {
            h.flush();
        }
        Ok(())
    }
}

/// Hands the freed heap of a dropped calibrating model back to the kernel (the `zaya`
/// binary never trims its heap on its own).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes writing the largest tensor that `plan` stores in a format GPTQ handles takes (a
/// model of `cfg`): its blocks (and their copy), and where GPTQ rounds it (a split tied
/// head included) its values in f32, one factor per matrix (f32 `cols²`) and the f64
/// scratch of two factorisations running side by side (other tensors are widened to f32 a
/// part of at most 16 Mi values at a time, two parts at once).
pub fn rounding_bytes(plan: &crate::quant::QuantPlan, cfg: &ZayaConfig) -> u64 {
    let plan = plan.for_model(cfg);
    native_specs(&plan.stored_config(cfg))
        .iter()
        .filter(|s| s.shape.len() >= 2 && in_gptq_format(&plan, s))
        .map(|s| {
            let elems: u64 = s.shape.iter().map(|&d| d as u64).product();
            let cols = *s.shape.last().unwrap_or(&0) as u64;
            let matrices = if s.shape.len() == 3 { s.shape[0] } else { 1 } as u64;
            let blocks = 2 * elems * 9 / 8;
            if applies_to(&s.name) {
                blocks + elems * 4 + matrices * cols * cols * 4 + 2 * 4 * cols * cols * 8
            } else {
                blocks + 2 * (4 << 24)
            }
        })
        .max()
        .unwrap_or(0)
}

/// Bytes the sums for the tensors of `cfg` that `wanted` accepts take (`cols²` f64 sums
/// and f32 partial sums per matrix), to refuse a calibration that cannot fit before the
/// model loads.
pub fn hessian_bytes(cfg: &ZayaConfig, wanted: impl Fn(&str) -> bool) -> u64 {
    native_specs(cfg)
        .iter()
        .filter(|s| s.shape.len() >= 2 && wanted(&s.name))
        .map(|s| {
            let cols = *s.shape.last().unwrap_or(&0) as u64;
            let matrices = if s.shape.len() == 3 { s.shape[0] } else { 1 } as u64;
            matrices * cols * cols * 12
        })
        .sum()
}

/// Which tensors share a calibration pass when the moments are collected layer by layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Layer(usize),
    /// Outside the decoder layers: the LM head (the tied embedding's product).
    Rest,
}

fn group_of(name: &str) -> Group {
    name.strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next()?.parse().ok())
        .map_or(Group::Rest, Group::Layer)
}

/// GPTQ's input moments while a GGUF is written tensor by tensor ([`Moments::of`]). When
/// every tensor's moments fit in memory beside the calibrating model they come from one
/// calibration pass; otherwise from one run per decoder layer, each keeping that layer's
/// moments only (the same sums: the model is the unquantized one either way), so the
/// memory is bounded by the largest layer's. The per-layer runs share one calibrating
/// model and carry the windows' states from layer to layer
/// ([`crate::imatrix::LayerwiseCalibration`]): each runs its own layer only.
pub struct Moments {
    dir: std::path::PathBuf,
    ids: Vec<u32>,
    calibration: crate::imatrix::Calibration,
    wanted: BTreeSet<String>,
    per_layer: bool,
    /// Bytes a per-layer run holds beside the model: the largest layer's moments, the LM
    /// head's, and the rounding of the largest tensor.
    layer_moments: u64,
    cfg_layers: usize,
    /// Every wanted tensor's moments (one pass).
    all: Option<Hessians>,
    /// Per layer: the calibrating model and its windows' states (opened at the first
    /// tensor that needs moments), the moments of the layer calibrated last, and of
    /// [`Group::Rest`] once calibrated.
    stream: Option<crate::imatrix::LayerwiseCalibration>,
    held: Option<(usize, Hessians)>,
    rest: Option<Hessians>,
    passes: usize,
    tokens: usize,
}

impl std::fmt::Debug for Moments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moments")
            .field("per_layer", &self.per_layer)
            .field("passes", &self.passes)
            .finish_non_exhaustive()
    }
}

impl Moments {
    /// Moments of the tensors of the checkpoint in `dir` that `plan` stores in a format GPTQ
    /// handles ([`moments_for`]), from the calibration text `ids`: all in one pass where
    /// they fit in memory and `force_per_layer` is false, else one pass per layer; an
    /// error naming the sizes when not even one layer's fit. Calibrates nothing yet when
    /// per layer; all at once, now.
    pub fn collect(
        dir: &Path,
        ids: &[u32],
        calibration: crate::imatrix::Calibration,
        plan: &crate::quant::QuantPlan,
        force_per_layer: bool,
    ) -> Result<Moments> {
        let cfg = crate::weights::Checkpoint::open(dir)?.config()?;
        let wanted = moments_for(plan, &cfg);
        let bytes = |g: Option<Group>| {
            hessian_bytes(&cfg, |n| {
                wanted.contains(n) && g.is_none_or(|g| group_of(n) == g)
            })
        };
        let all = bytes(None);
        // per layer: the largest layer's moments beside the LM head's (kept from the start:
        // a tied embedding, written first, asks for them), and what rounding the largest
        // tensor takes while the calibrating model stays loaded
        let largest = (0..cfg.num_hidden_layers)
            .map(|l| bytes(Some(Group::Layer(l))))
            .max()
            .unwrap_or(0)
            + bytes(Some(Group::Rest))
            + rounding_bytes(plan, &cfg);
        // per layer, the windows' residual streams are kept between layers as well
        let tokens = match calibration.max_tokens {
            0 => ids.len(),
            n => n.min(ids.len()),
        };
        let largest_with_states = largest + crate::imatrix::layerwise_bytes(&cfg, tokens);
        // the calibrating model runs in f32, or bf16 where that does not fit
        let model = crate::weights::Checkpoint::required_bytes(&cfg, DType::BF16);
        let available = crate::weights::available_memory_bytes();
        let fits = |b: u64| available.is_none_or(|a| model + b <= a);
        let per_layer = force_per_layer || !fits(all);
        if per_layer && !fits(largest_with_states) {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            return Err(ZayaError::Input(format!(
                "GPTQ of {} needs {:.2} GiB for the input moments of its largest layer and its \
                 LM head, rounding its largest tensor and the calibration windows' states ({:.2} GiB of moments for all layers; f64 and f32 \
                 in × in sums per quantized weight and expert) beside \
                 {:.2} GiB for the calibrating model in bf16, but {:.2} GiB is available \
                 (MemAvailable in /proc/meminfo); quantize without --gptq, or on a machine \
                 with more memory",
                dir.display(),
                gib(largest_with_states),
                gib(all),
                gib(model),
                gib(available.unwrap_or(0))
            )));
        }
        let mut m = Moments {
            dir: dir.to_path_buf(),
            ids: ids.to_vec(),
            calibration,
            wanted,
            per_layer,
            layer_moments: largest,
            cfg_layers: cfg.num_hidden_layers,
            all: None,
            stream: None,
            held: None,
            rest: None,
            passes: 0,
            tokens: 0,
        };
        if !per_layer {
            let names = m.wanted.clone();
            m.all = Some(m.one_pass(move |n| names.contains(n), all)?);
        }
        Ok(m)
    }

    /// Every `wanted` tensor's moments from whole forwards of a model loaded for this pass.
    fn one_pass(
        &mut self,
        wanted: impl Fn(&str) -> bool + Send + Sync + 'static,
        reserve: u64,
    ) -> Result<Hessians> {
        let collector = std::sync::Arc::new(HessianCollector::new(wanted));
        let seen = crate::imatrix::calibrate(
            &self.dir,
            &self.ids,
            self.calibration,
            std::sync::Arc::clone(&collector) as std::sync::Arc<dyn InputObserver>,
            reserve,
        )?;
        let collector = std::sync::Arc::try_unwrap(collector).map_err(|_| {
            ZayaError::Input("internal: the calibrating model outlived its run".into())
        })?;
        // The pass's model is gone: hand its freed heap back to the kernel (the zaya
        // binary never trims its heap; on ZAYA1-8B, when each layer's pass loaded a model
        // of its own, 7 GB, then 11 GB of them stayed resident).
        trim_heap();
        self.passes += 1;
        self.tokens = seen;
        Ok(collector.finish())
    }

    /// One layer's run (or the LM head's) on the shared calibrating model, observing the
    /// tensors in `names`.
    fn calibrate_group(&mut self, g: Group, names: BTreeSet<String>) -> Result<Hessians> {
        let stream = match &mut self.stream {
            Some(s) => s,
            None => self
                .stream
                .insert(crate::imatrix::LayerwiseCalibration::open(
                    &self.dir,
                    &self.ids,
                    self.calibration,
                    self.layer_moments,
                )?),
        };
        let collector = std::sync::Arc::new(HessianCollector::new(move |n| names.contains(n)));
        let observer = std::sync::Arc::clone(&collector) as std::sync::Arc<dyn InputObserver>;
        match g {
            Group::Layer(l) => stream.layer(l, observer)?,
            Group::Rest => stream.head(observer)?,
        }
        self.passes += 1;
        self.tokens = stream.tokens();
        let collector = std::sync::Arc::try_unwrap(collector).map_err(|_| {
            ZayaError::Input("internal: the calibrating model kept the moments' collector".into())
        })?;
        Ok(collector.finish())
    }

    /// The moments of tensor `name` (one entry per matrix), or `None` when it has none
    /// (not wanted, or no calibration row reached it). Per layer, the first tensor of a
    /// layer runs that layer's calibration pass and drops the previous layer's moments.
    pub fn of(&mut self, name: &str) -> Result<Option<&[Option<Hessian>]>> {
        if !self.wanted.contains(name) {
            return Ok(None);
        }
        if !self.per_layer {
            return Ok(self
                .all
                .as_ref()
                .and_then(|h| h.get(name))
                .map(Vec::as_slice));
        }
        let g = group_of(name);
        let cached = match g {
            Group::Rest => self.rest.is_some(),
            Group::Layer(l) => self.held.as_ref().is_some_and(|(h, _)| *h == l),
        };
        if !cached {
            if let Group::Layer(_) = g {
                self.held = None; // free the last layer's moments before the next run
            }
            let names: BTreeSet<String> = self
                .wanted
                .iter()
                .filter(|n| group_of(n) == g)
                .cloned()
                .collect();
            let h = self.calibrate_group(g, names)?;
            match g {
                Group::Rest => self.rest = Some(h),
                Group::Layer(l) => self.held = Some((l, h)),
            }
            // the LM head's and the last layer's moments are in: the writer asks for no
            // other run, so the calibrating model goes (it would return for one)
            let last = self.cfg_layers.checked_sub(1);
            if self.rest.is_some() && self.held.as_ref().map(|(l, _)| *l) == last {
                self.stream = None;
                trim_heap();
            }
        }
        let h = match g {
            Group::Rest => self.rest.as_ref(),
            Group::Layer(_) => self.held.as_ref().map(|(_, h)| h),
        };
        Ok(h.and_then(|h| h.get(name)).map(Vec::as_slice))
    }

    /// Whether the moments come one layer at a time.
    pub fn per_layer(&self) -> bool {
        self.per_layer
    }

    /// Calibration passes run so far.
    pub fn passes(&self) -> usize {
        self.passes
    }

    /// Tokens each pass saw.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// The grid of one block of format `d`: element `j` decodes to `scale[j] · q − offset[j]`
/// with its level `q ∈ [lo, hi]`. Returns `(lo, hi)`.
pub fn grid(d: GgmlDType, b: &[u8], scale: &mut [f32], offset: &mut [f32]) -> (i32, i32) {
    use crate::kernels::{f16_at, scale_min_k4};
    let f16 = |i: usize| f16_at(b, i);
    match d {
        GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q5_0 => {
            let dd = f16(0);
            let (lo, hi, zero) = match d {
                GgmlDType::Q8_0 => (-128, 127, 0.0),
                GgmlDType::Q4_0 => (0, 15, 8.0),
                _ => (0, 31, 16.0),
            };
            scale.fill(dd);
            offset.fill(dd * zero);
            (lo, hi)
        }
        GgmlDType::Q4_1 | GgmlDType::Q5_1 => {
            scale.fill(f16(0));
            offset.fill(-f16(2));
            (0, if d == GgmlDType::Q4_1 { 15 } else { 31 })
        }
        GgmlDType::Q4K | GgmlDType::Q5K => {
            let (dd, dmin) = (f16(0), f16(2));
            let sc = &b[4..16];
            for s in 0..8 {
                let (ls, lm) = scale_min_k4(s, sc);
                scale[32 * s..32 * s + 32].fill(dd * ls as f32);
                offset[32 * s..32 * s + 32].fill(dmin * lm as f32);
            }
            (0, if d == GgmlDType::Q4K { 15 } else { 31 })
        }
        GgmlDType::Q6K => {
            let dd = f16(208);
            for s in 0..16 {
                let a = dd * (b[192 + s] as i8) as f32;
                scale[16 * s..16 * s + 16].fill(a);
                offset[16 * s..16 * s + 16].fill(a * 32.0);
            }
            (0, 63)
        }
        _ => unreachable!("grid of unsupported format {d:?}"),
    }
}

/// Where element `j`'s level lives in a block: `(byte, shift)` of its low 4 bits (8 for
/// Q8_0), and for 5/6-bit levels `(byte, shift)` of its high bits.
fn location(d: GgmlDType, j: usize) -> ((usize, u32), Option<(usize, u32)>) {
    match d {
        GgmlDType::Q8_0 => ((2 + j, 0), None),
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
            let base = match d {
                GgmlDType::Q4_0 => 2,
                GgmlDType::Q4_1 => 4,
                GgmlDType::Q5_0 => 6,
                _ => 8,
            };
            let low = (base + j % 16, 4 * (j / 16) as u32);
            let high = match d {
                GgmlDType::Q5_0 => Some((2 + j / 8, (j % 8) as u32)),
                GgmlDType::Q5_1 => Some((4 + j / 8, (j % 8) as u32)),
                _ => None,
            };
            (low, high)
        }
        GgmlDType::Q4K | GgmlDType::Q5K => {
            // 64-value chunks: values 0..32 in the low nibbles of 32 bytes, 32..64 in the
            // high ones; Q5_K's fifth bits: bit (2·chunk + half) of byte (j mod 32) of qh
            let (chunk, half, l) = (j / 64, (j % 64) / 32, j % 32);
            let qs = if d == GgmlDType::Q4K { 16 } else { 48 };
            let low = (qs + 32 * chunk + l, 4 * half as u32);
            let high = (d == GgmlDType::Q5K).then_some((16 + l, (2 * chunk + half) as u32));
            (low, high)
        }
        GgmlDType::Q6K => {
            // halves of 128; in each, quarter `k` of 32: low nibbles from ql[64h + l (+32)]
            // (low nibble for k = 0, 1; high for 2, 3), two high bits from qh[32h + l] at 2k
            let (h, k, l) = (j / 128, (j % 128) / 32, j % 32);
            let low = (64 * h + l + 32 * (k % 2), 4 * (k / 2) as u32);
            (low, Some((128 + 32 * h + l, 2 * k as u32)))
        }
        _ => unreachable!("levels of unsupported format {d:?}"),
    }
}

/// Element `j`'s level in block `b` of format `d`.
pub fn level(d: GgmlDType, b: &[u8], j: usize) -> i32 {
    let ((lb, ls), high) = location(d, j);
    if d == GgmlDType::Q8_0 {
        return b[lb] as i8 as i32;
    }
    let low = ((b[lb] >> ls) & 0x0f) as i32;
    match high {
        None => low,
        Some((hb, hs)) if d == GgmlDType::Q6K => low | ((((b[hb] >> hs) & 3) as i32) << 4),
        Some((hb, hs)) => low | ((((b[hb] >> hs) & 1) as i32) << 4),
    }
}

/// Sets element `j`'s level in block `b` of format `d` (`q` within the format's range).
pub fn set_level(d: GgmlDType, b: &mut [u8], j: usize, q: i32) {
    let ((lb, ls), high) = location(d, j);
    if d == GgmlDType::Q8_0 {
        b[lb] = q as i8 as u8;
        return;
    }
    b[lb] = (b[lb] & !(0x0f << ls)) | (((q & 0x0f) as u8) << ls);
    match high {
        None => {}
        Some((hb, hs)) if d == GgmlDType::Q6K => {
            b[hb] = (b[hb] & !(3 << hs)) | ((((q >> 4) & 3) as u8) << hs)
        }
        Some((hb, hs)) => b[hb] = (b[hb] & !(1 << hs)) | ((((q >> 4) & 1) as u8) << hs),
    }
}

/// What GPTQ needs of a matrix's input moments: the feature order and the upper Cholesky
/// factor `U` of `(H + λI)⁻¹` in that order (`H⁻¹ = UᵀU`), factored in f64 and kept in f32
/// for the rounding (as GPTQ's reference implementation runs it).
struct Factor {
    order: Vec<usize>,
    u: Vec<f32>,
}

impl Factor {
    fn new(h: &Hessian) -> Option<Factor> {
        let (order, u) = ordered_inverse_factor(h)?;
        let u = u.into_iter().map(|v| v as f32).collect();
        Some(Factor { order, u })
    }
}

/// The feature order (decreasing input energy) and, in f64, the upper factor of the
/// damped `H⁻¹` in that order; the damping grows tenfold (up to five times) until the
/// factorisation exists.
fn ordered_inverse_factor(h: &Hessian) -> Option<(Vec<usize>, Vec<f64>)> {
    let n = h.cols;
    let rows = h.rows.max(1) as f64;
    let diag = |i: usize| h.sums[i * n + i] / rows;
    // features never active: nothing to compensate through them (their rounding is
    // free), a unit diagonal keeps the factorisation defined
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| diag(b).total_cmp(&diag(a)));
    let mean = (0..n).map(diag).sum::<f64>() / n.max(1) as f64;
    let mut damp = DAMP * if mean > 0.0 { mean } else { 1.0 };
    for _ in 0..6 {
        let mut a = vec![0.0; n * n];
        for (i, &oi) in order.iter().enumerate() {
            for (j, &oj) in order.iter().enumerate() {
                a[i * n + j] = h.sums[oi * n + oj] / rows;
            }
            if a[i * n + i] == 0.0 {
                a[i * n + i] = 1.0;
            }
            a[i * n + i] += damp;
        }
        if let Some(u) = inverse_upper_factor(a, n) {
            return Some((order, u));
        }
        damp *= 10.0;
    }
    None
}

/// `Σ a_k b_k` in eight independent sums (so that the loop vectorises).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Rows of a factorisation that take the finished rows' contributions together: each
/// finished row is read once per block (from L1) instead of once per row (from memory at
/// `n = 2048`, where the triangle is 16 MiB).
const FACTOR_ROWS: usize = 32;

/// In-place lower Cholesky factor of the `n × n` matrix `a` (row-major, row by row: each
/// entry is a dot product of two finished rows; the upper triangle is zeroed); `None` when
/// it is not positive definite. Rows go in blocks of [`FACTOR_ROWS`], the rows before a
/// block entering all its rows one after another; every entry sees the same operations in
/// the same order as row by row.
fn cholesky(a: &mut [f64], n: usize) -> Option<()> {
    for i0 in (0..n).step_by(FACTOR_ROWS) {
        let i1 = (i0 + FACTOR_ROWS).min(n);
        let (done, block) = a.split_at_mut(i0 * n);
        for k in 0..i0 {
            let rk = &done[k * n..k * n + k + 1];
            for ri in block[..(i1 - i0) * n].chunks_mut(n) {
                ri[k] = (ri[k] - dot(&ri[..k], &rk[..k])) / rk[k];
            }
        }
        for i in i0..i1 {
            let (before, rest) = block.split_at_mut((i - i0) * n);
            let ri = &mut rest[..n];
            for k in i0..i {
                let rk = &before[(k - i0) * n..(k - i0) * n + k + 1];
                ri[k] = (ri[k] - dot(&ri[..k], &rk[..k])) / rk[k];
            }
            let d = ri[i] - dot(&ri[..i], &ri[..i]);
            if d <= 0.0 || !d.is_finite() {
                return None;
            }
            ri[i] = d.sqrt();
            ri[i + 1..].fill(0.0);
        }
    }
    Some(())
}

/// `U` (upper triangular, row-major) with `a⁻¹ = UᵀU`, from one factorisation: with `P`
/// the reversal permutation and `PaP = LLᵀ`, `a⁻¹ = P L⁻ᵀ L⁻¹ P = UᵀU` for `U = P L⁻¹ P`
/// (upper, as `P · lower · P` is).
fn inverse_upper_factor(a: Vec<f64>, n: usize) -> Option<Vec<f64>> {
    let flip = |m: &[f64]| {
        let mut out = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                out[i * n + j] = m[(n - 1 - i) * n + (n - 1 - j)];
            }
        }
        out
    };
    let mut l = flip(&a);
    cholesky(&mut l, n)?;
    // X = L⁻¹ row by row: X_i = (e_i − Σ_{k<i} L_ik X_k) / L_ii (X lower triangular);
    // in blocks of rows as the factorisation, the same operations in the same order
    let mut x = vec![0.0; n * n];
    let axpy = |xi: &mut [f64], lik: f64, xk: &[f64]| {
        if lik != 0.0 {
            for (v, xk) in xi.iter_mut().zip(xk) {
                *v -= lik * xk;
            }
        }
    };
    for i0 in (0..n).step_by(FACTOR_ROWS) {
        let i1 = (i0 + FACTOR_ROWS).min(n);
        let (done, block) = x.split_at_mut(i0 * n);
        for (i, xi) in (i0..i1).zip(block.chunks_mut(n)) {
            xi[i] = 1.0;
        }
        for k in 0..i0 {
            let xk = &done[k * n..=k * n + k];
            for (i, xi) in (i0..i1).zip(block.chunks_mut(n)) {
                axpy(&mut xi[..=k], l[i * n + k], xk);
            }
        }
        for i in i0..i1 {
            let (before, rest) = block.split_at_mut((i - i0) * n);
            let xi = &mut rest[..n];
            for k in i0..i {
                axpy(
                    &mut xi[..=k],
                    l[i * n + k],
                    &before[(k - i0) * n..=(k - i0) * n + k],
                );
            }
            let d = l[i * n + i];
            for v in &mut xi[..=i] {
                *v /= d;
            }
        }
    }
    Some(flip(&x))
}

/// Re-chooses the levels of a tile of rows (`w`: `rows × n` values, `bytes`: their blocks,
/// `row_bytes` per row) by GPTQ, on the grid the blocks already hold. The rows are
/// independent; a tile goes through `U` once. Features go in batches of [`BATCH`]: within
/// a batch each rounding error updates the batch's later features at once, and the
/// batch's errors reach every feature after it in one product `X −= E · U[batch, after]`
/// — the same updates as feature by feature (up to the order of the sums), at GEMM speed.
fn round_rows(
    d: GgmlDType,
    w: &[f32],
    bytes: &mut [u8],
    row_bytes: usize,
    f: &Factor,
) -> Result<()> {
    use crate::kernels::cpu::{gemm, MatMut, MatRef};
    let n = f.order.len();
    let tile = w.len() / n;
    let (bs, ts) = (d.block_size(), d.type_size());
    let (mut scale, mut offset) = (vec![0f32; tile * n], vec![0f32; tile * n]);
    let (mut lo, mut hi) = (0, 0);
    for r in 0..tile {
        for (b, blk) in bytes[r * row_bytes..(r + 1) * row_bytes]
            .chunks(ts)
            .enumerate()
        {
            let e = r * n + b * bs..r * n + (b + 1) * bs;
            (lo, hi) = grid(d, blk, &mut scale[e.clone()], &mut offset[e]);
        }
    }
    let mut x: Vec<f32> = (0..tile)
        .flat_map(|r| f.order.iter().map(move |&c| w[r * n + c]))
        .collect();
    let mut errors = vec![0f32; tile * BATCH];
    for j0 in (0..n).step_by(BATCH) {
        let j1 = (j0 + BATCH).min(n);
        for j in j0..j1 {
            let c = f.order[j];
            let urow = &f.u[j * n..(j + 1) * n];
            for r in 0..tile {
                let (a, o) = (scale[r * n + c], offset[r * n + c]);
                let blk =
                    &mut bytes[r * row_bytes + (c / bs) * ts..r * row_bytes + (c / bs + 1) * ts];
                let xr = &mut x[r * n..(r + 1) * n];
                let q = if a == 0.0 {
                    // a block of zeros (or a zero sub-scale): every level decodes to −o
                    level(d, blk, c % bs)
                } else {
                    (((xr[j] + o) / a).round() as i64).clamp(lo as i64, hi as i64) as i32
                };
                set_level(d, blk, c % bs, q);
                let err = (xr[j] - (a * q as f32 - o)) / urow[j];
                for (v, u) in xr[j + 1..j1].iter_mut().zip(&urow[j + 1..j1]) {
                    *v -= err * u;
                }
                errors[r * BATCH + (j - j0)] = err;
            }
        }
        if j1 < n {
            gemm(
                tile,
                n - j1,
                j1 - j0,
                MatMut::new(&mut x, j1, n),
                true,
                MatRef::rows(&errors, 0, BATCH),
                MatRef::rows(&f.u, j0 * n + j1, n),
                -1.0,
                false,
            )?;
        }
    }
    Ok(())
}

/// Re-chooses by GPTQ the levels of `bytes`, the quantization of `t` (`[R, C]` or a
/// stacked `[E, R, C]`, any float dtype) in format `d`, keeping every block's scales:
/// matrix `m` with `hessians[m]`, a matrix without one (or with fewer rows than
/// [`MIN_ROWS_PER_FEATURE`] asks) as it is. Returns how many matrices GPTQ rounded.
pub fn requantize(
    t: &Tensor,
    d: GgmlDType,
    bytes: &mut [u8],
    hessians: &[Option<Hessian>],
) -> Result<usize> {
    if !supports(d) {
        return Err(ZayaError::Input(format!("no GPTQ for {d:?} blocks")));
    }
    let dims = t.dims().to_vec();
    let cols = *dims.last().unwrap_or(&0);
    let matrices = if dims.len() == 3 { dims[0] } else { 1 };
    let (bs, ts) = (d.block_size(), d.type_size());
    if !(2..=3).contains(&dims.len())
        || matrices == 0
        || cols == 0
        || !cols.is_multiple_of(bs)
        || hessians.len() > matrices
    {
        return Err(ZayaError::Input(format!(
            "a {dims:?} tensor in {d:?} blocks with {} moment matrices",
            hessians.len()
        )));
    }
    let row_bytes = cols / bs * ts;
    let rows = t.elem_count() / cols / matrices;
    if bytes.len() != matrices * rows * row_bytes {
        return Err(ZayaError::Input(format!(
            "{} bytes for a {dims:?} tensor in {d:?} (expected {})",
            bytes.len(),
            matrices * rows * row_bytes
        )));
    }
    if let Some(h) = hessians
        .iter()
        .flatten()
        .find(|h| h.cols != cols || h.sums.len() != cols * cols)
    {
        return Err(ZayaError::Input(format!(
            "input moments of {} features ({} sums) for rows of {cols}",
            h.cols,
            h.sums.len()
        )));
    }
    // the factorisations of a stack side by side (each ~n³/2 flops on one thread)
    let factors = crate::kernels::cpu::par_map(hessians.len(), hessians.len() * cols.pow(3), |m| {
        hessians[m]
            .as_ref()
            .filter(|h| h.rows >= MIN_ROWS_PER_FEATURE * h.cols as u64)
            // not positive definite even damped: the plain rounding stays
            .and_then(Factor::new)
    });
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut done = 0;
    for (m, factor) in factors.iter().enumerate() {
        let Some(factor) = factor else { continue };
        let w = &values[m * rows * cols..(m + 1) * rows * cols];
        let out = &mut bytes[m * rows * row_bytes..(m + 1) * rows * row_bytes];
        let per = rows.div_ceil(4 * crate::kernels::cpu::num_threads()).max(1);
        let parts = crate::kernels::cpu::par_map(rows.div_ceil(per), rows * cols * cols, |p| {
            let (r0, r1) = (p * per, ((p + 1) * per).min(rows));
            let mut b = out[r0 * row_bytes..r1 * row_bytes].to_vec();
            for t0 in (r0..r1).step_by(TILE) {
                let t1 = (t0 + TILE).min(r1);
                round_rows(
                    d,
                    &w[t0 * cols..t1 * cols],
                    &mut b[(t0 - r0) * row_bytes..(t1 - r0) * row_bytes],
                    row_bytes,
                    factor,
                )?;
            }
            Ok::<_, ZayaError>(b)
        });
        for (p, b) in parts.into_iter().enumerate() {
            let b = b?;
            out[p * per * row_bytes..p * per * row_bytes + b.len()].copy_from_slice(&b);
        }
        done += 1;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::Device;

    const FORMATS: [GgmlDType; 8] = [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// Every element's value from [`grid`] and [`level`], and the level of every element
    /// written back by [`set_level`]: candle's dequantization, and the same bytes.
    #[test]
    fn grids_and_levels_decode_as_candle_does() {
        let t = Tensor::randn(0f32, 1.0, (6, 512), &Device::Cpu).unwrap();
        for d in FORMATS {
            let q = crate::quant::quantize(&t, d).unwrap();
            let bytes = q.data().unwrap().into_owned();
            let want = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let (bs, ts) = (d.block_size(), d.type_size());
            let (mut scale, mut offset) = (vec![0f32; bs], vec![0f32; bs]);
            let mut rewritten = bytes.clone();
            for (b, blk) in bytes.chunks(ts).enumerate() {
                let (lo, hi) = grid(d, blk, &mut scale, &mut offset);
                let out = &mut rewritten[b * ts..(b + 1) * ts];
                for j in 0..bs {
                    let l = level(d, blk, j);
                    assert!((lo..=hi).contains(&l), "{d:?} level {l}");
                    let v = scale[j] * l as f32 - offset[j];
                    let w = want[b * bs + j];
                    assert!(
                        (v - w).abs() <= 1e-6 * w.abs().max(1e-3),
                        "{d:?} {b}/{j}: {v} vs {w}"
                    );
                    // the other levels of the same byte survive a write
                    set_level(d, out, j, if l == hi { lo } else { l + 1 });
                    assert_eq!(level(d, out, j), if l == hi { lo } else { l + 1 }, "{d:?}");
                    set_level(d, out, j, l);
                }
            }
            assert!(
                rewritten == bytes,
                "{d:?}: rewriting every level changed the bytes"
            );
        }
    }

    /// `mᵀm` in f64 for a random `[rows, n]` matrix `m`: a positive definite `H`.
    fn gram(rows: usize, n: usize) -> Vec<f64> {
        let m = Tensor::randn(0f32, 1.0, (rows, n), &Device::Cpu).unwrap();
        m.t()
            .unwrap()
            .matmul(&m)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }

    /// The `[out, cols]` matrix that blocks `b` of format `d` decode to (candle's decoder).
    fn dequantize(d: GgmlDType, b: &[u8], out: usize, cols: usize) -> Tensor {
        let dev = Device::Cpu;
        let s = candle_core::quantized::QStorage::from_data(std::borrow::Cow::Borrowed(b), &dev, d)
            .unwrap();
        QTensor::new(s, (out, cols))
            .unwrap()
            .dequantize(&dev)
            .unwrap()
    }

    /// The plain quantizer's blocks of `w` in format `d`.
    fn plain_blocks(w: &Tensor, d: GgmlDType) -> Vec<u8> {
        crate::quant::quantize(w, d)
            .unwrap()
            .data()
            .unwrap()
            .into_owned()
    }

    /// `‖x (w − q)ᵀ‖²`: how far the layer's outputs on inputs `x` move.
    fn output_error(x: &Tensor, w: &Tensor, q: &Tensor) -> f64 {
        let e = x.matmul(&(w - q).unwrap().t().unwrap()).unwrap();
        e.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    }

    /// `(H + λI)⁻¹ = UᵀU` with `U` upper triangular.
    #[test]
    fn the_factor_is_the_inverse_upper_cholesky() {
        let n = 5;
        let h = gram(9, n);
        let u = inverse_upper_factor(h.clone(), n).unwrap();
        for i in 0..n {
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0);
            }
        }
        // UᵀU · H = I
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n)
                    .map(|k| {
                        (0..n).map(|p| u[p * n + i] * u[p * n + k]).sum::<f64>() * h[k * n + j]
                    })
                    .sum();
                assert!(
                    (v - f64::from(u8::from(i == j))).abs() < 1e-9,
                    "({i},{j}) {v}"
                );
            }
        }
        let singular = vec![1.0, 1.0, 1.0, 1.0];
        assert!(inverse_upper_factor(singular, 2).is_none());
    }

    /// Inputs whose features are correlated (as a layer's are): GPTQ's levels give
    /// outputs `x · Wᵀ` much closer to the dense product than the plain rounding, on the
    /// plain rounding's own block scales, in every format; with uncorrelated unit inputs
    /// (`H = I`) it rounds each weight to its nearest level, no worse than plain.
    #[test]
    fn gptq_levels_cut_the_output_error_on_the_plain_grid() {
        let dev = Device::Cpu;
        let (rows, cols, out) = (1024, 256, 12);
        let z = Tensor::randn(0f32, 1.0, (rows, cols), &dev).unwrap();
        let mix = (Tensor::randn(0f32, 0.3, (cols, cols), &dev).unwrap()
            + Tensor::eye(cols, DType::F32, &dev).unwrap())
        .unwrap();
        let x = z.matmul(&mix).unwrap();
        let moments = |x: &Tensor| {
            let c = HessianCollector::new(|_| true);
            c.observe("w", None, x).unwrap();
            c.finish().remove("w").unwrap()
        };
        let correlated = moments(&x);
        // unit inputs, one row per feature: H = I
        let identity = vec![Some(Hessian {
            cols,
            rows: cols as u64,
            sums: (0..cols * cols)
                .map(|i| {
                    if i % (cols + 1) == 0 {
                        cols as f64
                    } else {
                        0.0
                    }
                })
                .collect(),
        })];
        let w = Tensor::randn(0f32, 1.0, (out, cols), &dev).unwrap();
        let deq = |d: GgmlDType, b: &[u8]| dequantize(d, b, out, cols);
        let output_error = |q: &Tensor| output_error(&x, &w, q);
        let weight_error = |q: &Tensor| -> f64 {
            (&w - q)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        for d in FORMATS {
            let plain = plain_blocks(&w, d);
            let mut gptq = plain.clone();
            assert_eq!(requantize(&w, d, &mut gptq, &correlated).unwrap(), 1);
            let (e_plain, e_gptq) = (output_error(&deq(d, &plain)), output_error(&deq(d, &gptq)));
            assert!(
                e_gptq < 0.7 * e_plain,
                "{d:?}: output error {e_gptq} vs plain {e_plain}"
            );
            // the same grid: every block's scales as the plain quantizer chose them
            let (bs, ts) = (d.block_size(), d.type_size());
            let grids = |b: &[u8]| {
                b.chunks(ts)
                    .flat_map(|blk| {
                        let (mut s, mut o) = (vec![0f32; bs], vec![0f32; bs]);
                        grid(d, blk, &mut s, &mut o);
                        s.into_iter().chain(o)
                    })
                    .collect::<Vec<f32>>()
            };
            assert_eq!(grids(&plain), grids(&gptq), "{d:?}");
            let mut nearest = plain.clone();
            requantize(&w, d, &mut nearest, &identity).unwrap();
            let (n, p) = (
                weight_error(&deq(d, &nearest)),
                weight_error(&deq(d, &plain)),
            );
            assert!(
                n <= p * (1.0 + 1e-6),
                "{d:?}: nearest levels {n} vs plain {p}"
            );
        }
        // a matrix without moments keeps its bytes; wrong sizes are errors
        let d = GgmlDType::Q8_0;
        let plain = plain_blocks(&w, d);
        let mut same = plain.clone();
        assert_eq!(requantize(&w, d, &mut same, &[None]).unwrap(), 0);
        let few = moments(&x.narrow(0, 0, cols - 1).unwrap());
        assert_eq!(requantize(&w, d, &mut same, &few).unwrap(), 0);
        assert!(same == plain);
        assert!(requantize(&w, d, &mut same[1..].to_vec(), &correlated).is_err());
        let narrow = moments(&x.narrow(1, 0, 128).unwrap());
        assert!(requantize(&w, d, &mut same, &narrow).is_err());
        assert!(requantize(&w, GgmlDType::Q2K, &mut same, &correlated).is_err());
        let empty = Tensor::zeros((0, out, cols), DType::F32, &dev).unwrap();
        assert!(requantize(&empty, d, &mut [], &[]).is_err());
    }

    /// Row-by-row Cholesky and triangular inverse, as written before the blocked ones (the
    /// same dot products and updates, one row at a time).
    fn factor_row_by_row(a: &[f64], n: usize) -> Option<Vec<f64>> {
        let mut l: Vec<f64> = (0..n * n)
            .map(|i| a[(n - 1 - i / n) * n + (n - 1 - i % n)])
            .collect();
        for i in 0..n {
            for k in 0..i {
                let s = dot(&l[i * n..i * n + k], &l[k * n..k * n + k]);
                l[i * n + k] = (l[i * n + k] - s) / l[k * n + k];
            }
            let d = l[i * n + i] - dot(&l[i * n..i * n + i], &l[i * n..i * n + i]);
            if d <= 0.0 {
                return None;
            }
            l[i * n + i] = d.sqrt();
            l[i * n + i + 1..(i + 1) * n].fill(0.0);
        }
        let mut x = vec![0.0; n * n];
        for i in 0..n {
            x[i * n + i] = 1.0;
            for k in 0..i {
                let lik = l[i * n + k];
                if lik != 0.0 {
                    for p in 0..=k {
                        x[i * n + p] -= lik * x[k * n + p];
                    }
                }
            }
            for p in 0..=i {
                x[i * n + p] /= l[i * n + i];
            }
        }
        Some(
            (0..n * n)
                .map(|i| x[(n - 1 - i / n) * n + (n - 1 - i % n)])
                .collect(),
        )
    }

    /// The blocked factorisation is the row-by-row one, bit for bit (a size that is no
    /// multiple of the block, so a partial last block too).
    #[test]
    fn the_blocked_factor_equals_the_row_by_row_one() {
        let n = 2 * FACTOR_ROWS + 7;
        let h = gram(3 * n, n);
        assert_eq!(
            inverse_upper_factor(h.clone(), n).unwrap(),
            factor_row_by_row(&h, n).unwrap()
        );
    }

    /// GPTQ feature by feature in f64, the error of each feature pushed onto every later
    /// one at once: the algorithm the batched f32 rounding reorganises.
    fn round_feature_by_feature(d: GgmlDType, w: &[f32], bytes: &mut [u8], f: &Factor, u: &[f64]) {
        let n = f.order.len();
        let (bs, ts) = (d.block_size(), d.type_size());
        let row_bytes = n / bs * ts;
        for (r, wr) in w.chunks(n).enumerate() {
            let row = &mut bytes[r * row_bytes..(r + 1) * row_bytes];
            let mut x: Vec<f64> = f.order.iter().map(|&c| wr[c] as f64).collect();
            for j in 0..n {
                let c = f.order[j];
                let blk = &mut row[(c / bs) * ts..(c / bs + 1) * ts];
                let (mut a, mut o) = (vec![0f32; bs], vec![0f32; bs]);
                let (lo, hi) = grid(d, blk, &mut a, &mut o);
                let (a, o) = (a[c % bs] as f64, o[c % bs] as f64);
                let q = if a == 0.0 {
                    level(d, blk, c % bs)
                } else {
                    (((x[j] + o) / a).round() as i64).clamp(lo as i64, hi as i64) as i32
                };
                set_level(d, blk, c % bs, q);
                let err = (x[j] - (a * q as f64 - o)) / u[j * n + j];
                for k in j + 1..n {
                    x[k] -= err * u[j * n + k];
                }
            }
        }
    }

    /// Deterministic noise, roughly normal (a sum of four uniforms), `[rows, cols]`.
    fn noise(seed: u64, rows: usize, cols: usize, sd: f32) -> Tensor {
        let mut state = seed;
        let mut uniform = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| (uniform() + uniform() + uniform() + uniform() - 2.0) * sd * 1.732)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// The batched rounding (tiles of rows, features in batches, the batches' errors
    /// through one product, f32) picks the levels the feature-by-feature f64 algorithm
    /// picks, but where a value lies within rounding noise of a level boundary (and the
    /// row's later levels then follow another, equally good path): at most 1 % of the
    /// levels differ, by one step, and the output error is the same within 1 %.
    #[test]
    fn batched_rounding_picks_the_feature_by_feature_levels() {
        let dev = Device::Cpu;
        let (rows, cols, out) = (600, 2 * BATCH * 3 + 64, TILE + 9);
        let z = noise(1, rows, cols, 1.0);
        let mix =
            (noise(2, cols, cols, 0.3) + Tensor::eye(cols, DType::F32, &dev).unwrap()).unwrap();
        let x = z.matmul(&mix).unwrap();
        let c = HessianCollector::new(|_| true);
        c.observe("w", None, &x).unwrap();
        let h = c.finish().remove("w").unwrap().remove(0).unwrap();
        let factor = Factor::new(&h).unwrap();
        // the f64 factor the f32 one was rounded from
        let (_, u) = ordered_inverse_factor(&h).unwrap();
        let w = noise(3, out, cols, 1.0);
        let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for d in FORMATS {
            let plain = plain_blocks(&w, d);
            let row_bytes = plain.len() / out;
            let (mut batched, mut reference) = (plain.clone(), plain.clone());
            for t0 in (0..out).step_by(TILE) {
                let t1 = (t0 + TILE).min(out);
                round_rows(
                    d,
                    &values[t0 * cols..t1 * cols],
                    &mut batched[t0 * row_bytes..t1 * row_bytes],
                    row_bytes,
                    &factor,
                )
                .unwrap();
            }
            round_feature_by_feature(d, &values, &mut reference, &factor, &u);
            let (bs, ts) = (d.block_size(), d.type_size());
            let levels = |b: &[u8]| -> Vec<i32> {
                b.chunks(ts)
                    .flat_map(|blk| (0..bs).map(|j| level(d, blk, j)).collect::<Vec<_>>())
                    .collect()
            };
            let (lb, lr) = (levels(&batched), levels(&reference));
            let differ = lb.iter().zip(&lr).filter(|(a, b)| a != b).count();
            assert!(
                differ * 100 <= lb.len(),
                "{d:?}: {differ} of {} levels differ",
                lb.len()
            );
            assert!(lb.iter().zip(&lr).all(|(a, b)| (a - b).abs() <= 1), "{d:?}");
            let output_error = |b: &[u8]| output_error(&x, &w, &dequantize(d, b, out, cols));
            let (eb, er) = (output_error(&batched), output_error(&reference));
            assert!(
                (eb - er).abs() <= 0.01 * er,
                "{d:?}: output error {eb} vs {er}"
            );
        }
    }

    /// The collector sums `xᵀx` per weight and per expert, for the names it wants only.
    #[test]
    fn the_collector_sums_input_moments_per_matrix() {
        let dev = Device::Cpu;
        let c = HessianCollector::new(|n| n != "skip");
        let a = Tensor::new(&[[1f32, 2.], [0., 1.]], &dev).unwrap();
        let b = Tensor::new(&[[3f32, -1.]], &dev).unwrap();
        c.observe("w", None, &a).unwrap();
        c.observe("w", None, &b).unwrap();
        c.observe("e", Some(2), &b).unwrap();
        c.observe("skip", None, &a).unwrap();
        assert!(c
            .observe("w", None, &Tensor::zeros((1, 3), DType::F32, &dev).unwrap())
            .is_err());
        let h = c.finish();
        assert_eq!(h.len(), 2);
        let w = h["w"][0].as_ref().unwrap();
        assert_eq!((w.cols, w.rows), (2, 3));
        assert_eq!(w.sums, vec![10., -1., -1., 6.]);
        assert_eq!(h["e"].len(), 3);
        assert!(h["e"][0].is_none() && h["e"][1].is_none());
        assert_eq!(h["e"][2].as_ref().unwrap().sums, vec![9., -3., -3., 1.]);

        // past FLUSH_ROWS the f32 partial sums join the f64 ones: the same sums as f64
        // throughout, within f32 rounding of each partial sum
        let c = HessianCollector::new(|_| true);
        let cols = 6;
        let mut want = vec![0f64; cols * cols];
        for part in 0..5 {
            let x = noise(part, FLUSH_ROWS / 2 + 37, cols, 1.0);
            let v = x.to_vec2::<f32>().unwrap();
            for r in &v {
                for i in 0..cols {
                    for j in 0..cols {
                        want[i * cols + j] += r[i] as f64 * r[j] as f64;
                    }
                }
            }
            c.observe("w", None, &x).unwrap();
        }
        let got = c.finish().remove("w").unwrap().remove(0).unwrap();
        assert_eq!(got.rows, 5 * (FLUSH_ROWS / 2 + 37) as u64);
        for (g, w) in got.sums.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * want[0].abs(), "{g} vs {w}");
        }
    }
}
