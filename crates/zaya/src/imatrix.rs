//! Importance matrices for quantization (llama.cpp's `imatrix`): for every weight a forward
//! multiplies, the mean square of each input feature over a calibration text. The quantizer
//! then weighs each weight's rounding error by how strongly its input feature is driven
//! (`quant::quantize_weighted`), so the error lands where the activations are small.
//!
//! The statistics come from the model itself through the weight seam: a model built with an
//! [`ImatrixCollector`] as its [`InputObserver`] hands every linear layer's input, and each
//! expert's routed tokens and SwiGLU activations, to the collector, and computes exactly
//! what it computes without one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::config::ZayaConfig;
use crate::error::{Result, ZayaError};
use crate::model::{ForwardOptions, InputObserver, Weights, ZayaModel};
use crate::weights::{native_specs, Checkpoint, TensorSpec};

/// Per-feature importance weights (`quant::quantize_weighted`): native tensor name → mean
/// squared input per input feature (the tensor's last axis); for a stacked `[E, out, in]`
/// expert tensor `E · in` values, expert by expert.
pub type ImportanceMatrix = BTreeMap<String, Vec<f32>>;

/// Sums of squared inputs of one weight (per matrix of a stack).
#[derive(Debug, Default)]
struct Sums {
    /// Input features, fixed by the first report.
    cols: usize,
    /// `[matrices · in]`.
    squares: Vec<f64>,
    /// Rows seen per matrix.
    rows: Vec<u64>,
}

impl Sums {
    /// The sums of squares on the diagonals of one tensor's moments (per matrix); `None`
    /// when no matrix has any.
    fn from_moments(list: &[Option<crate::gptq::Hessian>]) -> Option<Sums> {
        let cols = list.iter().flatten().map(|h| h.cols).next()?;
        let mut s = Sums {
            cols,
            squares: vec![0.0; list.len() * cols],
            rows: vec![0; list.len()],
        };
        for (m, h) in list.iter().enumerate() {
            if let Some(h) = h.as_ref().filter(|h| h.cols == cols) {
                s.rows[m] = h.rows;
                for i in 0..cols {
                    s.squares[m * cols + i] = h.sums[i * cols + i];
                }
            }
        }
        Some(s)
    }
}

/// The importance weights of tensor `name` of `shape` (as [`ImatrixCollector::finish`]
/// gives them) from its GPTQ moments' diagonals; `None` for moments without rows.
pub fn importance_from_moments(
    name: &str,
    shape: &[usize],
    moments: &[Option<crate::gptq::Hessian>],
) -> Result<Option<Vec<f32>>> {
    match Sums::from_moments(moments) {
        Some(s) => means(name, shape, &s),
        None => Ok(None),
    }
}

/// Accumulates the squared inputs that an observed model reports (see the module docs).
#[derive(Debug, Default)]
pub struct ImatrixCollector {
    sums: Mutex<BTreeMap<String, Sums>>,
}

impl InputObserver for ImatrixCollector {
    fn observe(&self, name: &str, expert: Option<usize>, x: &Tensor) -> candle_core::Result<()> {
        let (rows, cols) = x.dims2()?;
        let squares = x.to_dtype(DType::F32)?.sqr()?.sum(0)?.to_vec1::<f32>()?;
        let m = expert.unwrap_or(0);
        let mut all = self.sums.lock().unwrap_or_else(|p| p.into_inner());
        let s = all.entry(name.to_string()).or_default();
        if s.rows.is_empty() {
            s.cols = cols;
        } else if s.cols != cols {
            candle_core::bail!(
                "`{name}` was observed with {cols} input features, earlier with {}",
                s.cols
            );
        }
        if s.rows.len() <= m {
            s.rows.resize(m + 1, 0);
            s.squares.resize((m + 1) * cols, 0.0);
        }
        s.rows[m] += rows as u64;
        for (acc, v) in s.squares[m * cols..(m + 1) * cols].iter_mut().zip(squares) {
            *acc += v as f64;
        }
        Ok(())
    }
}

impl ImatrixCollector {
    pub fn new() -> Self {
        Self::default()
    }

    /// The collector an observing run over the same text would be, from GPTQ's input
    /// moments: their diagonals are the sums of squares per feature (up to the order of
    /// the sums), their row counts the rows.
    pub fn from_moments(moments: &crate::gptq::Hessians) -> Self {
        let all = moments
            .iter()
            .filter_map(|(name, list)| Some((name.clone(), Sums::from_moments(list)?)))
            .collect();
        Self {
            sums: Mutex::new(all),
        }
    }

    /// The mean squares, per tensor of `cfg` that was observed. An expert that no
    /// calibration token reached has no statistics of its own. For `gate_up_proj` it gets
    /// the mean over its stack's tokens: every expert of a layer reads the same normalised
    /// hidden state, so that is the best estimate there is. `down_proj` reads each expert's
    /// own SwiGLU activations, whose features mean nothing across experts, so there it gets
    /// one value for all features (the stack's mean over features and tokens): uniform
    /// weights at the stack's scale.
    pub fn finish(&self, cfg: &ZayaConfig) -> Result<ImportanceMatrix> {
        let all = self.sums.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = ImportanceMatrix::new();
        for spec in native_specs(cfg) {
            let Some(s) = all.get(&spec.name) else {
                continue;
            };
            if let Some(values) = means(&spec.name, &spec.shape, s)? {
                out.insert(spec.name, values);
            }
        }
        Ok(out)
    }
}

/// One tensor's mean squares from its sums (the rules of [`ImatrixCollector::finish`]);
/// `None` when no row reached it.
fn means(name: &str, shape: &[usize], s: &Sums) -> Result<Option<Vec<f32>>> {
    let cols = *shape.last().unwrap_or(&0);
    let matrices = if shape.len() == 3 { shape[0] } else { 1 };
    if s.rows.len() > matrices || s.squares.len() != s.rows.len() * cols {
        return Err(ZayaError::Input(format!(
            "importance statistics of `{}` do not fit its shape {:?}",
            name, shape
        )));
    }
    let total_rows: u64 = s.rows.iter().sum();
    if total_rows == 0 || cols == 0 {
        return Ok(None);
    }
    let mut pooled = vec![0f64; cols];
    for m in s.squares.chunks(cols) {
        for (p, v) in pooled.iter_mut().zip(m) {
            *p += v;
        }
    }
    if name.ends_with(".mlp.experts.down_proj") {
        let flat = pooled.iter().sum::<f64>() / cols as f64;
        pooled.fill(flat);
    }
    let mut values = Vec::with_capacity(matrices * cols);
    for m in 0..matrices {
        match s.rows.get(m).copied().unwrap_or(0) {
            0 => values.extend(pooled.iter().map(|v| (v / total_rows as f64) as f32)),
            n => values.extend(
                s.squares[m * cols..(m + 1) * cols]
                    .iter()
                    .map(|v| (v / n as f64) as f32),
            ),
        }
    }
    Ok(Some(values))
}

/// Checks `m` against a model's tensors before anything is quantized: every entry names a
/// tensor of the model and has one value per input feature (per matrix of a stack), all
/// finite and non-negative.
pub fn check(m: &ImportanceMatrix, specs: &[TensorSpec]) -> Result<()> {
    for (name, values) in m {
        let Some(spec) = specs.iter().find(|s| &s.name == name) else {
            return Err(ZayaError::Input(format!(
                "the importance matrix has an entry for `{name}`, which this model does not have \
                 (a matrix of another model?)"
            )));
        };
        crate::quant::importance_fits(&spec.shape, values.len())
            .map_err(|e| ZayaError::Input(format!("the importance matrix for `{name}`: {e}")))?;
        if let Some(v) = values.iter().find(|v| !v.is_finite() || **v < 0.0) {
            return Err(ZayaError::Input(format!(
                "the importance matrix has the value {v} for `{name}` (mean squares are finite and \
                 non-negative)"
            )));
        }
    }
    Ok(())
}

/// Writes `m` as a safetensors file: one 1-D f32 tensor per entry, under its tensor's name.
pub fn save(m: &ImportanceMatrix, path: &Path) -> Result<()> {
    let tensors = m
        .iter()
        .map(|(name, v)| Ok((name.clone(), Tensor::from_slice(v, v.len(), &Device::Cpu)?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    candle_core::safetensors::save(&tensors, path).map_err(|e| {
        ZayaError::Input(format!(
            "writing the importance matrix {}: {e}",
            path.display()
        ))
    })
}

/// Reads a matrix [`save`] wrote.
pub fn load(path: &Path) -> Result<ImportanceMatrix> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        ZayaError::Input(format!(
            "reading the importance matrix {}: {e}",
            path.display()
        ))
    })?;
    let mut m = ImportanceMatrix::new();
    for (name, t) in tensors {
        if t.rank() != 1 || t.dtype() != DType::F32 {
            return Err(ZayaError::Input(format!(
                "{}: `{name}` is {:?} {:?}; an importance matrix holds 1-D f32 tensors",
                path.display(),
                t.dtype(),
                t.dims()
            )));
        }
        m.insert(name, t.to_vec1::<f32>()?);
    }
    Ok(m)
}

/// How much calibration text to run, and how.
#[derive(Debug, Clone, Copy)]
pub struct Calibration {
    /// Tokens per window (each a fresh context, BOS first when there is one).
    pub context: usize,
    /// Stop after this many tokens (0: all of them).
    pub max_tokens: usize,
    /// The token every window starts with.
    pub bos: Option<u32>,
}

/// Runs the checkpoint in `dir` (either layout) over `ids` and returns its importance matrix
/// and the number of tokens it saw. The model runs in f32, or in bf16 where f32 does not fit
/// in memory (the squares are summed in f32/f64 either way).
pub fn importance_matrix(
    dir: &Path,
    ids: &[u32],
    calibration: Calibration,
) -> Result<(ImportanceMatrix, usize)> {
    let collector = Arc::new(ImatrixCollector::new());
    let seen = calibrate(
        dir,
        ids,
        calibration,
        Arc::clone(&collector) as Arc<dyn InputObserver>,
        0,
    )?;
    let cfg = Checkpoint::open(dir)?.config()?;
    Ok((collector.finish(&cfg)?, seen))
}

/// Runs the checkpoint in `dir` (either layout) over `ids` in windows, every product's
/// input handed to `observer`, and returns the number of tokens it saw: the calibration
/// pass of [`importance_matrix`] and of GPTQ (`crate::gptq::hessians`). The model runs in
/// f32, or in bf16 where f32 and the `reserve` bytes the observer will hold do not both
/// fit in memory.
pub fn calibrate(
    dir: &Path,
    ids: &[u32],
    calibration: Calibration,
    observer: Arc<dyn InputObserver>,
    reserve: u64,
) -> Result<usize> {
    let windows = windows(ids, calibration)?;
    let model = calibrating_model(dir, observer, reserve)?;
    let dev = Device::Cpu;
    let opts = ForwardOptions {
        skip_lm_head: true,
        ..ForwardOptions::default()
    };
    for w in &windows {
        let input = Tensor::new(w.as_slice(), &dev)?.unsqueeze(0)?;
        let out = model.forward(&input, None, &opts)?;
        model.observe_lm_head_input(&out.last_hidden)?;
    }
    Ok(seen(&windows, calibration))
}

/// `ids` cut into the calibration windows (BOS first), `max_tokens` of them in all.
fn windows(ids: &[u32], calibration: Calibration) -> Result<Vec<Vec<u32>>> {
    let Calibration {
        context,
        max_tokens,
        bos,
    } = calibration;
    if context < 2 {
        return Err(ZayaError::Input(format!(
            "calibration windows need at least 2 tokens, got {context}"
        )));
    }
    if ids.is_empty() {
        // before the model loads (minutes at the 8B scale)
        return Err(ZayaError::Input(
            "the calibration text has no tokens".to_string(),
        ));
    }
    let body = context - usize::from(bos.is_some());
    let mut seen = 0;
    let mut out = Vec::new();
    for chunk in ids.chunks(body) {
        if max_tokens > 0 && seen >= max_tokens {
            break;
        }
        let take = if max_tokens > 0 {
            chunk.len().min(max_tokens - seen)
        } else {
            chunk.len()
        };
        out.push(
            bos.into_iter()
                .chain(chunk[..take].iter().copied())
                .collect(),
        );
        seen += take;
    }
    Ok(out)
}

/// Text tokens (BOS not counted) in `windows`.
fn seen(windows: &[Vec<u32>], calibration: Calibration) -> usize {
    let bos = usize::from(calibration.bos.is_some());
    windows.iter().map(|w| w.len() - bos).sum()
}

/// The checkpoint in `dir` with every product's input handed to `observer`: in f32, or in
/// bf16 where f32 and `reserve` more bytes do not both fit in memory.
fn calibrating_model(
    dir: &Path,
    observer: Arc<dyn InputObserver>,
    reserve: u64,
) -> Result<ZayaModel> {
    let ckpt = Arc::new(Checkpoint::open(dir)?);
    let cfg = ckpt.config()?;
    ckpt.validate(&cfg)?;
    let f32_fits = crate::weights::available_memory_bytes().is_none_or(|available| {
        Checkpoint::required_bytes(&cfg, DType::F32) + reserve <= available
    });
    let dtype = if f32_fits {
        DType::F32
    } else {
        ckpt.check_fits(&cfg, DType::BF16, None)?;
        DType::BF16
    };
    let weights = Weights::from(ckpt.var_builder(&cfg, dtype, &Device::Cpu)).observed_by(observer);
    ZayaModel::from_weights(&cfg, weights)
}

/// Bytes [`LayerwiseCalibration`] keeps between layers for `tokens` calibration tokens of
/// a model of `cfg`: each window's f32 residual stream and router state.
pub fn layerwise_bytes(cfg: &ZayaConfig, tokens: usize) -> u64 {
    (tokens as u64 + 1) * (cfg.hidden_size + cfg.router_hidden_size + 1) as u64 * 4
}

/// The calibration pass one decoder layer at a time, the model loaded once: every
/// window's residual stream and router state are kept between layers, so observing the
/// inputs of layer `l` runs layer `l` only — what per-layer GPTQ moments need on a model
/// whose moments do not fit in memory all at once (ZAYA1-8B: 41 runs of one layer instead
/// of 41 loads and whole forwards). The same operations on the same inputs as
/// [`calibrate`]'s whole forwards, so an observer sees the same rows.
pub struct LayerwiseCalibration {
    model: ZayaModel,
    switch: Arc<ObserverSwitch>,
    windows: Vec<WindowState>,
    /// Per window length: its masks and RoPE tables.
    contexts: BTreeMap<usize, crate::model::ForwardContext>,
    /// The layer every window's state is at the input of.
    next: usize,
    tokens: usize,
}

struct WindowState {
    input: Tensor,
    hidden: Tensor,
    router_state: Option<Tensor>,
}

impl std::fmt::Debug for LayerwiseCalibration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerwiseCalibration")
            .field("windows", &self.windows.len())
            .field("next", &self.next)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

/// Hands each product's input to the observer of the current layer run, if any.
#[derive(Debug, Default)]
struct ObserverSwitch(Mutex<Option<Arc<dyn InputObserver>>>);

impl ObserverSwitch {
    fn set(&self, observer: Option<Arc<dyn InputObserver>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = observer;
    }
}

impl InputObserver for ObserverSwitch {
    fn wants(&self, name: &str) -> bool {
        let current = self.0.lock().unwrap_or_else(|p| p.into_inner());
        current.as_ref().is_some_and(|o| o.wants(name))
    }

    fn observe(&self, name: &str, expert: Option<usize>, x: &Tensor) -> candle_core::Result<()> {
        let current = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match current {
            Some(o) => o.observe(name, expert, x),
            None => Ok(()),
        }
    }
}

impl LayerwiseCalibration {
    /// Loads the checkpoint in `dir` (f32, or bf16 where f32, the kept states and
    /// `reserve` more bytes do not fit) and embeds the calibration windows of `ids`.
    pub fn open(dir: &Path, ids: &[u32], calibration: Calibration, reserve: u64) -> Result<Self> {
        let windows = windows(ids, calibration)?;
        let tokens = seen(&windows, calibration);
        let cfg = Checkpoint::open(dir)?.config()?;
        // the checks a whole forward makes (ids within the vocabulary, windows within the
        // positions), before the model loads
        for w in &windows {
            let input = Tensor::new(w.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            crate::model::check_input_ids(&cfg, &input, 0)?;
        }
        let kept = layerwise_bytes(&cfg, windows.iter().map(Vec::len).sum());
        let switch = Arc::new(ObserverSwitch::default());
        let model = calibrating_model(
            dir,
            Arc::clone(&switch) as Arc<dyn InputObserver>,
            reserve + kept,
        )?;
        let mut stream = LayerwiseCalibration {
            model,
            switch,
            windows: Vec::with_capacity(windows.len()),
            contexts: BTreeMap::new(),
            next: 0,
            tokens,
        };
        for w in windows {
            let input = Tensor::new(w.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            stream.windows.push(WindowState {
                hidden: stream.model.embed(&input)?,
                input,
                router_state: None,
            });
        }
        Ok(stream)
    }

    /// Text tokens each run sees.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Runs decoder layer `layer` over every window with `observer` seeing its products.
    /// The layers before it run first, unobserved, where the windows are not at its input
    /// yet (from the embedding again where they are past it).
    pub fn layer(&mut self, layer: usize, observer: Arc<dyn InputObserver>) -> Result<()> {
        let layers = self.model.config().num_hidden_layers;
        if layer >= layers {
            return Err(ZayaError::Input(format!(
                "calibration of layer {layer}: the model has {layers} layers"
            )));
        }
        self.advance_to(layer)?;
        self.switch.set(Some(observer));
        let run = self.step();
        self.switch.set(None);
        run
    }

    /// Runs the final norm over every window (after the layers not run yet) and hands
    /// its output, the LM head's input, to `observer` (the logits are not computed).
    pub fn head(&mut self, observer: Arc<dyn InputObserver>) -> Result<()> {
        self.advance_to(self.model.config().num_hidden_layers)?;
        self.switch.set(Some(observer));
        let run = self.windows.iter().try_for_each(|w| {
            let y = self.model.final_norm(&w.hidden)?;
            self.model.observe_lm_head_input(&y)
        });
        self.switch.set(None);
        run
    }

    /// Brings every window to the input of layer `layer` (unobserved), from the embedding
    /// again where they are past it.
    fn advance_to(&mut self, layer: usize) -> Result<()> {
        if self.next > layer {
            self.restart()?;
        }
        while self.next < layer {
            self.step()?;
        }
        Ok(())
    }

    fn restart(&mut self) -> Result<()> {
        for w in &mut self.windows {
            w.hidden = self.model.embed(&w.input)?;
            w.router_state = None;
        }
        self.next = 0;
        Ok(())
    }

    /// Advances every window through layer `self.next`. A failure part way leaves the
    /// windows at different layers: they start again from the embedding at the next run.
    fn step(&mut self) -> Result<()> {
        let idx = self.next;
        self.next = usize::MAX;
        for w in &mut self.windows {
            let t = w.input.dim(1)?;
            if !self.contexts.contains_key(&t) {
                let ctx = self.model.context(1, t, None, &ForwardOptions::default())?;
                self.contexts.insert(t, ctx);
            }
            let out = self.model.layer_forward(
                idx,
                &w.hidden,
                w.router_state.as_ref(),
                &self.contexts[&t],
                None,
                false,
            )?;
            w.hidden = out.hidden;
            w.router_state = Some(out.routing.state);
        }
        self.next = idx + 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ZayaConfig {
        ZayaConfig::from_json(&serde_json::json!({
            "vocab_size": 64, "hidden_size": 4, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
            "moe_intermediate_size": 2, "num_experts": 3, "router_hidden_size": 2,
            "layer_types": ["hybrid"], "max_position_embeddings": 16
        }))
        .unwrap()
    }

    fn rows(v: &[&[f32]]) -> Tensor {
        let cols = v[0].len();
        let flat: Vec<f32> = v.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (v.len(), cols), &Device::Cpu).unwrap()
    }

    /// The importance matrix from GPTQ's moments equals the one observed from the same
    /// rows (including the pooling of an unreached expert).
    #[test]
    fn moments_give_the_observed_importance_matrix() {
        let o = "model.layers.0.mlp.gate.down_proj.weight";
        let gu = "model.layers.0.mlp.experts.gate_up_proj";
        let dn = "model.layers.0.mlp.experts.down_proj";
        let seen = ImatrixCollector::new();
        let moments = crate::gptq::HessianCollector::new(|_| true);
        let batches: [(&str, Option<usize>, Tensor); 5] = [
            (o, None, rows(&[&[1., 2., 0., -1.], &[3., 0., 0.5, 1.]])),
            (o, None, rows(&[&[1., 1., 1., 1.]])),
            (gu, Some(2), rows(&[&[2., 0., -3., 0.]])),
            (gu, Some(0), rows(&[&[0., 1., 0., 0.], &[0., 3., 0., 7.]])),
            (dn, Some(1), rows(&[&[0.5, -1.]])),
        ];
        for (name, e, x) in &batches {
            seen.observe(name, *e, x).unwrap();
            moments.observe(name, *e, x).unwrap();
        }
        let want = seen.finish(&cfg()).unwrap();
        let got = ImatrixCollector::from_moments(&moments.finish())
            .finish(&cfg())
            .unwrap();
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>()
        );
        for (name, w) in &want {
            assert_eq!(w.len(), got[name].len(), "{name}");
            for (a, b) in w.iter().zip(&got[name]) {
                assert!(
                    (a - b).abs() <= 1e-6 * a.abs().max(1.0),
                    "{name}: {a} vs {b}"
                );
            }
        }
    }

    /// Means over all rows seen, per matrix of a stack; an expert no row reached gets the
    /// stack's mean over all its rows (`gate_up`), or that mean's average over the
    /// features (`down`); unobserved tensors have no entry.
    #[test]
    fn means_per_feature_per_expert_and_pooled_for_unreached_experts() {
        let c = ImatrixCollector::new();
        let o = "model.layers.0.mlp.gate.down_proj.weight";
        let gu = "model.layers.0.mlp.experts.gate_up_proj";
        c.observe(o, None, &rows(&[&[1., 2., 0., 0.], &[3., 0., 0., 1.]]))
            .unwrap();
        c.observe(o, None, &rows(&[&[1., 1., 1., 1.]])).unwrap();
        c.observe(gu, Some(2), &rows(&[&[2., 0., 0., 0.]])).unwrap();
        c.observe(gu, Some(0), &rows(&[&[0., 1., 0., 0.], &[0., 3., 0., 0.]]))
            .unwrap();
        let m = c.finish(&cfg()).unwrap();
        assert_eq!(m[o], vec![11. / 3., 5. / 3., 1. / 3., 2. / 3.]);
        let pooled = [4. / 3., 10. / 3., 0., 0.];
        let want: Vec<f32> = [[0., 5., 0., 0.], pooled, [4., 0., 0., 0.]]
            .concat()
            .to_vec();
        assert_eq!(m[gu], want);
        let down = "model.layers.0.mlp.experts.down_proj";
        c.observe(down, Some(1), &rows(&[&[1., 3.], &[1., 1.]]))
            .unwrap();
        let m = c.finish(&cfg()).unwrap();
        assert_eq!(m[down], vec![3., 3., 1., 5., 3., 3.]);
        assert_eq!(m.len(), 3);
        // a tensor reported with two widths is an error, not a silent mix, also for a
        // later matrix of a stack
        assert!(c.observe(o, None, &rows(&[&[1., 2.]])).is_err());
        assert!(c.observe(gu, Some(4), &rows(&[&[1., 2.]])).is_err());
    }

    /// A saved matrix reads back equal; a file of other tensors, a value that is no mean
    /// square, or a width the tensor does not have is refused, naming the tensor.
    #[test]
    fn saved_matrices_read_back_and_bad_ones_are_refused() {
        let dir = std::env::temp_dir().join(format!("zaya-imatrix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let specs = native_specs(&cfg());
        let o = "model.layers.0.mlp.gate.down_proj.weight";
        let gu = "model.layers.0.mlp.experts.gate_up_proj";
        let m: ImportanceMatrix = [
            (o.to_string(), vec![1.0, 2.0, 0.0, 3.5]),
            (gu.to_string(), (0..12).map(|i| i as f32).collect()),
        ]
        .into();
        check(&m, &specs).unwrap();
        let path = dir.join("m.safetensors");
        save(&m, &path).unwrap();
        assert_eq!(load(&path).unwrap(), m);

        let two_d = dir.join("2d.safetensors");
        let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&[(o.to_string(), t)].into(), &two_d).unwrap();
        assert!(load(&two_d).unwrap_err().to_string().contains(o));

        for (name, values) in [
            (o, vec![1.0, -1.0, 0.0, 0.0]),
            (o, vec![1.0; 3]),
            (gu, vec![1.0; 8]),
        ] {
            let bad: ImportanceMatrix = [(name.to_string(), values)].into();
            assert!(check(&bad, &specs).unwrap_err().to_string().contains(name));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
