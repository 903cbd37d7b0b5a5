//! The weight seam: where a layer gets its weights from ([`Weights`]: a `VarBuilder` for
//! dense tensors plus an optional source of quantized ones) and the linear layer whose
//! weight is either form ([`Linear`]). A tensor-parallel shard would be a third form here.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;

/// Something that holds (or makes) quantized forms of a checkpoint's tensors: a GGUF file,
/// or a dense checkpoint quantized while it loads (`--quant`).
pub trait QuantizedSource: Send + Sync {
    /// The quantized form of native tensor `name`, or `None` when it stays dense.
    fn quantized(&self, name: &str) -> Result<Option<Arc<QTensor>>>;

    /// The float dtype dense tensor `name` is stored in, where the source can hand it out
    /// in that dtype as it is (a GGUF's bf16 tensors); `None` where it does not say.
    fn stored_dtype(&self, _name: &str) -> Option<DType> {
        None
    }
}

/// Sees the inputs of the matrix products a quantizer can quantize (every [`Linear`], the
/// tied lm_head as `embed_tokens`, each expert's `gate_up` and `down`) during a forward
/// pass: what an importance matrix for quantization is computed from. The grouped CCA
/// convolution is not reported (it stays in full precision). A model built with one (see
/// [`Weights::observed_by`]) computes exactly what it computes without.
pub trait InputObserver: Send + Sync + std::fmt::Debug {
    /// `x` `[rows, in]` is multiplied by native weight `name` (`[out, in]`), or by matrix
    /// `expert` of a stacked `[E, out, in]` weight.
    fn observe(&self, name: &str, expert: Option<usize>, x: &Tensor) -> Result<()>;

    /// Whether inputs of weight `name` are wanted at all: where not, the layers skip the
    /// work of preparing them (the experts' gathered rows and recomputed activations).
    fn wants(&self, _name: &str) -> bool {
        true
    }
}

/// An observer and the native name of the weight it watches.
#[derive(Debug, Clone)]
pub struct Observed {
    pub observer: Arc<dyn InputObserver>,
    pub name: String,
}

impl Observed {
    pub fn observe(&self, expert: Option<usize>, x: &Tensor) -> Result<()> {
        self.observer.observe(&self.name, expert, x)
    }

    /// [`InputObserver::wants`] for this weight.
    pub fn wants(&self) -> bool {
        self.observer.wants(&self.name)
    }
}

/// What the model's constructors read their weights from. It mirrors the `VarBuilder`
/// methods the layers use, and adds [`Weights::quantized`].
#[derive(Clone)]
pub struct Weights<'a> {
    vb: VarBuilder<'a>,
    quant: Option<Arc<dyn QuantizedSource + 'a>>,
    observer: Option<Arc<dyn InputObserver>>,
}

impl<'a> From<VarBuilder<'a>> for Weights<'a> {
    fn from(vb: VarBuilder<'a>) -> Self {
        Weights::new(vb, None)
    }
}

impl<'a> Weights<'a> {
    /// Dense tensors from `vb`, quantized ones from `quant` where it has them.
    pub fn new(vb: VarBuilder<'a>, quant: Option<Arc<dyn QuantizedSource + 'a>>) -> Self {
        Weights {
            vb,
            quant,
            observer: None,
        }
    }

    /// Every layer built from these weights reports the inputs of its weight products to
    /// `observer`.
    pub fn observed_by(mut self, observer: Arc<dyn InputObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The observer of weight `name` under the current prefix, if the model is observed.
    pub fn observed(&self, name: &str) -> Option<Observed> {
        self.observer.as_ref().map(|o| Observed {
            observer: Arc::clone(o),
            name: self.full_name(name),
        })
    }

    pub fn pp<S: ToString>(&self, s: S) -> Self {
        Weights {
            vb: self.vb.pp(s),
            quant: self.quant.clone(),
            observer: self.observer.clone(),
        }
    }

    pub fn get<S: Into<Shape>>(&self, s: S, name: &str) -> Result<Tensor> {
        self.vb.get(s, name)
    }

    pub fn get_with_hints_dtype<S: Into<Shape>>(
        &self,
        s: S,
        name: &str,
        hints: candle_nn::Init,
        dtype: DType,
    ) -> Result<Tensor> {
        self.vb.get_with_hints_dtype(s, name, hints, dtype)
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    fn full_name(&self, name: &str) -> String {
        let prefix = self.vb.prefix();
        if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        }
    }

    /// A frozen weight whose op reads bf16 weights with f32 activations in place (the
    /// `matmul` kernel, the CCA convolution): on a quantized model loaded in f32 whose
    /// source stores it in bf16 (router, CCA, kept projections of a GGUF written from a
    /// bf16 checkpoint), it stays bf16 — the same values as its f32 widening, and half the
    /// bytes a decode step reads (80 MB per token of the 8B). Anything else: as [`Self::get`].
    /// Quantized models are frozen, so no trainable tensor takes this path.
    pub fn get_stored<S: Into<Shape>>(&self, s: S, name: &str) -> Result<Tensor> {
        let keep_bf16 = self.vb.dtype() == DType::F32
            && self
                .quant
                .as_ref()
                .is_some_and(|src| src.stored_dtype(&self.full_name(name)) == Some(DType::BF16));
        if keep_bf16 {
            self.vb
                .get_with_hints_dtype(s, name, candle_nn::Init::Const(0.), DType::BF16)
        } else {
            self.vb.get(s, name)
        }
    }

    /// The quantized form of `name` under the current prefix, checked against `shape`.
    pub fn quantized<S: Into<Shape>>(&self, s: S, name: &str) -> Result<Option<Arc<QTensor>>> {
        let Some(src) = &self.quant else {
            return Ok(None);
        };
        let full = self.full_name(name);
        let Some(q) = src.quantized(&full)? else {
            return Ok(None);
        };
        let s = s.into();
        if q.shape() != &s {
            candle_core::bail!(
                "quantized tensor `{full}` has shape {:?}, expected {:?}",
                q.shape().dims(),
                s.dims()
            );
        }
        Ok(Some(q))
    }
}

/// A weight matrix `[out, in]` in one of its storage forms.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// A tensor in its stored dtype (f32 / bf16 / f16); trainable when built from a VarMap.
    Dense(Tensor),
    /// Block-quantized rows (candle's Q8_0, k-quants, …); frozen.
    Quantized(Arc<QTensor>),
}

impl LinearWeight {
    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            LinearWeight::Dense(w) => w.dims2().unwrap_or((0, 0)),
            LinearWeight::Quantized(q) => q.shape().dims2().unwrap_or((0, 0)),
        }
    }

    /// Bytes the weight occupies (and a matmul over it reads).
    pub fn bytes(&self) -> usize {
        match self {
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// The quantized format, if any.
    pub fn ggml_dtype(&self) -> Option<GgmlDType> {
        match self {
            LinearWeight::Dense(_) => None,
            LinearWeight::Quantized(q) => Some(q.dtype()),
        }
    }

    /// `x · Wᵀ` for 2-D `x` `[rows, in]`.
    fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            // through the registry: decode-sized inputs take the threaded GEMV
            LinearWeight::Dense(w) => crate::kernels::linear(x, w),
            // candle's quantized matmul takes f32 rows (it quantizes them to the weight's
            // dot-product partner format itself) and returns f32.
            LinearWeight::Quantized(q) => crate::kernels::quantized::qmatmul_t(x, q),
        }
    }
}

/// `x · Wᵀ + b` over the last axis, weights stored `[out, in]` as in PyTorch, plus an
/// optional low-rank adapter (LoRA) added to the output; the weight itself is never changed
/// by the adapter (it stays in its stored form, frozen).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
    pub adapter: Option<LowRank>,
    /// Sees this layer's inputs (importance-matrix calibration); never changes the output.
    pub observer: Option<Observed>,
}

/// A LoRA addition `scale · B (A · dropout(x))` to a layer's output, computed in the
/// adapter's dtype (the input is cast to it and the sum cast back to the layer's output
/// dtype, as PEFT does). `a` is `[r, in]`, `b` `[out, r]`: PEFT's `lora_A` / `lora_B`.
#[derive(Debug, Clone)]
pub struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// Training only: inverted dropout on the adapter's input.
    pub dropout: Option<Dropout>,
}

/// Inverted dropout whose mask is a pure function of `(key, element index)`: recomputing a
/// layer (gradient checkpointing) draws the same mask, and no state changes between calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f64,
    /// Differs per layer, module and micro-batch.
    pub key: u64,
}

impl Dropout {
    /// `[rows, cols]` mask of 0 and `1 / (1 − p)`.
    pub fn mask(&self, rows: usize, cols: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let keep = 1.0 / (1.0 - self.p);
        // the top 53 bits of a splitmix64 draw, as a uniform in [0, 1)
        let threshold = self.p;
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let u = (splitmix64(self.key ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
                    >> 11) as f64
                    / (1u64 << 53) as f64;
                if u < threshold {
                    0.0
                } else {
                    keep as f32
                }
            })
            .collect();
        Tensor::from_vec(data, (rows, cols), device)?.to_dtype(dtype)
    }
}

/// A 64-bit mixing function (splitmix64's finaliser).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl LowRank {
    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.a.dim(0).unwrap_or(0)
    }

    /// `scale · B (A x)` for 2-D `x` `[rows, in]`, in the adapter's dtype.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.a.dtype())?;
        let x = match &self.dropout {
            Some(d) if d.p > 0.0 => {
                let (rows, cols) = x.dims2()?;
                x.mul(&d.mask(rows, cols, x.dtype(), x.device())?)?
            }
            _ => x,
        };
        x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)? * self.scale
    }

    /// `y + delta(x)` computed in the adapter's dtype, returned in `y`'s dtype.
    pub fn add_to(&self, y: &Tensor, x: &Tensor) -> Result<Tensor> {
        let out = y.dtype();
        (y.to_dtype(self.a.dtype())? + self.delta(x)?)?.to_dtype(out)
    }

    /// `scale · B A` `[out, in]` (what merging adds to the weight).
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b.matmul(&self.a)? * self.scale
    }
}

impl Linear {
    /// Reads `weight` (quantized when the source has it quantized) and `bias`.
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: Weights) -> Result<Self> {
        let weight = match vb.quantized((out_dim, in_dim), "weight")? {
            Some(q) => LinearWeight::Quantized(q),
            None => LinearWeight::Dense(vb.get_stored((out_dim, in_dim), "weight")?),
        };
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            adapter: None,
            observer: vb.observed("weight"),
        })
    }

    /// A dense layer over `weight` `[out, in]`.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: LinearWeight::Dense(weight),
            bias,
            adapter: None,
            observer: None,
        }
    }

    /// The dense weight, if the layer has one (training and gradient code need it).
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Some(w),
            LinearWeight::Quantized(_) => None,
        }
    }

    /// Bytes of weight and bias: what one forward reads from memory.
    pub fn bytes(&self) -> usize {
        self.weight.bytes()
            + self
                .bias
                .as_ref()
                .map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes())
    }

    /// Hands `x` `[.., in]` to the layer's observer, if any, as [`Linear::forward`] would,
    /// without computing the product (calibration wants the inputs only).
    pub fn observe_input(&self, x: &Tensor) -> Result<()> {
        if let Some(o) = &self.observer {
            let in_dim = x.dims().last().copied().unwrap_or(0);
            o.observe(None, &x.reshape(((), in_dim))?)?;
        }
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x2, dims) = rows_of(x)?;
        if let Some(o) = &self.observer {
            o.observe(None, &x2)?;
        }
        let y = self.weight.matmul_t(&x2)?;
        self.finish(y, &x2, &dims)
    }

    /// The outputs of `layers` for the same input `x`, each what its [`Linear::forward`]
    /// gives. Where every weight is a k-quant of one format (a quantized model's q/k/value
    /// projections), or every weight is a frozen f32 matrix and `x` a decode step's rows,
    /// the products run as one: all the rows split over the threads together (and a
    /// k-quant's input rounded once) — a decode step's value projections alone are too
    /// short to split well.
    pub fn forward_same_input(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        match Self::try_forward_same_input(layers, x)? {
            Some(ys) => Ok(ys),
            None => layers.iter().map(|l| l.forward(x)).collect(),
        }
    }

    /// [`Linear::forward_same_input`] where the products run as one; `None` where they
    /// would run layer by layer (the caller then runs each when it needs it).
    pub fn try_forward_same_input(layers: &[&Linear], x: &Tensor) -> Result<Option<Vec<Tensor>>> {
        if layers.len() < 2 {
            return Ok(None);
        }
        let (x2, dims) = rows_of(x)?;
        let quantized: Option<Vec<&Arc<QTensor>>> = layers
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Quantized(q) => Some(q),
                LinearWeight::Dense(_) => None,
            })
            .collect();
        let dense: Option<Vec<&Tensor>> = layers.iter().map(|l| l.dense_weight()).collect();
        let together = match (quantized, dense) {
            (Some(qs), _) => crate::kernels::quantized::qmatmul_t_same_input(&x2, &qs)?,
            (_, Some(ws)) => crate::kernels::linear_same_input(&x2, &ws)?,
            _ => None,
        };
        let Some(ys) = together else {
            return Ok(None);
        };
        for l in layers {
            if let Some(o) = &l.observer {
                o.observe(None, &x2)?;
            }
        }
        layers
            .iter()
            .zip(ys)
            .map(|(l, y)| l.finish(y, &x2, &dims))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Bias and adapter added to the product `y` `[rows, out]` of `x2` `[rows, in]`, shaped
    /// as the input `dims` with the output width last.
    fn finish(&self, y: Tensor, x2: &Tensor, dims: &[usize]) -> Result<Tensor> {
        let y = match &self.bias {
            Some(b) => crate::kernels::bias_add(&y, b)?,
            None => y,
        };
        let y = match &self.adapter {
            Some(ad) => ad.add_to(&y, x2)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rows_of keeps the feature axis") = self.weight.dims().0;
        y.reshape(out_dims)
    }
}

/// `x` `[.., in]` as 2-D rows `[rows, in]`, and its dims.
fn rows_of(x: &Tensor) -> Result<(Tensor, Vec<usize>)> {
    let dims = x.dims().to_vec();
    let Some(&in_dim) = dims.last() else {
        candle_core::bail!("linear: the input is a scalar, it needs a feature axis");
    };
    let rows: usize = dims[..dims.len() - 1].iter().product();
    Ok((x.reshape((rows, in_dim))?, dims))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantized(n: usize, k: usize, dtype: GgmlDType, seed: u64) -> Linear {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)
            .unwrap()
            .affine(1.0, seed as f64 * 0.01)
            .unwrap();
        Linear {
            weight: LinearWeight::Quantized(Arc::new(QTensor::quantize(&w, dtype).unwrap())),
            bias: None,
            adapter: None,
            observer: None,
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// Records the rows each weight's observer is shown.
    #[derive(Debug, Default)]
    struct Seen(std::sync::Mutex<Vec<(String, Vec<u32>)>>);

    impl InputObserver for Seen {
        fn observe(&self, name: &str, expert: Option<usize>, x: &Tensor) -> Result<()> {
            assert_eq!(expert, None);
            self.0.lock().unwrap().push((name.to_string(), bits(x)));
            Ok(())
        }
    }

    /// Where the products run as one, every layer's observer still sees the input once,
    /// as its own forward shows it (calibration of an importance matrix over short rows).
    #[test]
    fn same_input_products_show_each_observer_the_input() {
        let k = 256;
        let seen = Arc::new(Seen::default());
        let observed = |name: &str, n: usize| Linear {
            observer: Some(Observed {
                observer: seen.clone(),
                name: name.to_string(),
            }),
            ..Linear::dense(
                Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap(),
                None,
            )
        };
        let (a, b) = (observed("a", 16), observed("b", 8));
        let x = Tensor::randn(0f32, 1.0, (1, 1, k), &Device::Cpu).unwrap();
        Linear::forward_same_input(&[&a, &b], &x).unwrap();
        let together = std::mem::take(&mut *seen.0.lock().unwrap());
        a.forward(&x).unwrap();
        b.forward(&x).unwrap();
        let alone = std::mem::take(&mut *seen.0.lock().unwrap());
        assert_eq!(together.len(), 2);
        assert_eq!(together, alone);
    }

    /// One product over several k-quant or f32 weights equals each layer's own forward bit
    /// for bit (with a bias and an adapter on some), at a decode step's one row and at a
    /// prefill's rows; mixed formats, mixed kinds and bf16 weights take the layers one by
    /// one.
    #[test]
    fn same_input_products_equal_the_layers_forwards() {
        let k = 512;
        let mut layers = [
            quantized(64, k, GgmlDType::Q4K, 1),
            quantized(16, k, GgmlDType::Q4K, 2),
            quantized(8, k, GgmlDType::Q4K, 3),
        ];
        layers[1].bias = Some(Tensor::randn(0f32, 1.0, 16, &Device::Cpu).unwrap());
        layers[2].adapter = Some(LowRank {
            a: Tensor::randn(0f32, 0.1, (2, k), &Device::Cpu).unwrap(),
            b: Tensor::randn(0f32, 0.1, (8, 2), &Device::Cpu).unwrap(),
            scale: 0.5,
            dropout: None,
        });
        let mixed = quantized(24, k, GgmlDType::Q6K, 4);
        let dense = |n: usize, bias: bool| {
            Linear::dense(
                Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap(),
                bias.then(|| Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap()),
            )
        };
        let (d1, d2, d3) = (dense(24, false), dense(8, true), dense(130, false));
        let to_bf16 = |l: &Linear| Linear {
            weight: LinearWeight::Dense(l.dense_weight().unwrap().to_dtype(DType::BF16).unwrap()),
            bias: l.bias.as_ref().map(|b| b.to_dtype(DType::BF16).unwrap()),
            adapter: None,
            observer: None,
        };
        let (b1, b2, b3) = (to_bf16(&d1), to_bf16(&d2), to_bf16(&d3));
        for rows in [1, 40] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, k), &Device::Cpu).unwrap();
            let xb = x.to_dtype(DType::BF16).unwrap();
            for (set, x) in [
                (vec![&layers[0], &layers[1], &layers[2]], &x),
                (vec![&layers[0], &mixed], &x),
                (vec![&d1, &layers[1]], &x),
                (vec![&d1, &d2, &d3], &x),
                (vec![&b1, &b2, &b3], &xb),
                (vec![&b1, &d2], &x),
            ] {
                let together = Linear::forward_same_input(&set, x).unwrap();
                assert_eq!(together.len(), set.len());
                for (l, y) in set.iter().zip(&together) {
                    let alone = l.forward(x).unwrap();
                    assert_eq!(y.dims(), alone.dims());
                    assert_eq!(y.dtype(), alone.dtype());
                    assert_eq!(bits(y), bits(&alone), "rows {rows}");
                }
            }
        }
    }
}
