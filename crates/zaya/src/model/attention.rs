//! CCA attention (`self_attn`): the CCA projection with its two causal convolutions, q/k
//! mean residuals and current/delayed value streams, QK L2-norm with `temp`, partial RoPE,
//! the attention core and `o_proj`.

use super::linear::Weights;
use candle_core::{DType, Result, Tensor, D};

use super::linear::Linear;
use crate::attention::{self as core, MaskSpec};
use crate::cache::LayerCache;
use crate::config::ZayaConfig;
use crate::kernels;

/// `self_attn.qkv_proj`: raw projections, causal convs, mean residuals and values.
#[derive(Debug, Clone)]
pub struct CcaProjection {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj_current: Linear,
    pub(crate) v_proj_delayed: Linear,
    /// `[C, 1, K0]`
    conv_qk_depthwise_weight: Tensor,
    conv_qk_depthwise_bias: Tensor,
    /// `[C, D, K1]`
    conv_qk_grouped_weight: Tensor,
    conv_qk_grouped_bias: Tensor,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    k0: usize,
    k1: usize,
}

/// Queries `[B,T,Nq,D]`, keys and values `[B,T,Nkv,D]`: queries and keys after the
/// mean residuals, the QK-norm and (keys) `temp`, before RoPE.
pub struct Qkv {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
}

impl CcaProjection {
    pub fn new(cfg: &ZayaConfig, vb: Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let c = cfg.conv_channels();
        let bias = cfg.attention_bias;
        Ok(CcaProjection {
            q_proj: Linear::new(h, cfg.q_dim(), bias, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, cfg.kv_dim(), bias, vb.pp("k_proj"))?,
            v_proj_current: Linear::new(h, cfg.value_half_dim(), bias, vb.pp("v_proj_current"))?,
            v_proj_delayed: Linear::new(h, cfg.value_half_dim(), bias, vb.pp("v_proj_delayed"))?,
            conv_qk_depthwise_weight: vb.get((c, 1, cfg.cca_time0), "conv_qk_depthwise.weight")?,
            conv_qk_depthwise_bias: vb.get(c, "conv_qk_depthwise.bias")?,
            conv_qk_grouped_weight: vb
                .get_stored((c, cfg.head_dim, cfg.cca_time1), "conv_qk_grouped.weight")?,
            conv_qk_grouped_bias: vb.get(c, "conv_qk_grouped.bias")?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            k0: cfg.cca_time0,
            k1: cfg.cca_time1,
        })
    }

    /// `a` is the input-normed hidden state `[B,T,H]`; `conv_mask` `[B,T]` zeroes padding
    /// before the projections; `temp` `[Nkv]` is `qk_norm.temp`. Reads and updates the conv
    /// and delayed-value states.
    pub fn forward(
        &self,
        a: &Tensor,
        temp: &Tensor,
        conv_mask: Option<&Tensor>,
        same_document: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Qkv> {
        // History columns: the cached raw projections, or zeros at a sequence start.
        let (history, prev_rec) = match &cache {
            Some(cache) if cache.has_previous_state() => (
                cache.conv_state().cloned(),
                cache.recurrent_state().cloned(),
            ),
            _ => (None, None),
        };
        let (qkv, conv, rec) =
            self.project(a, temp, conv_mask, same_document, history, prev_rec)?;
        if let Some(cache) = cache {
            cache.set_cca_state(conv, rec);
        }
        Ok(qkv)
    }

    /// The delayed value a sequence starts from (`v_proj_delayed` of a zero input), `[B, Hv]`.
    pub fn start_delayed_value(&self, b: usize, a: &Tensor) -> Result<Tensor> {
        self.v_proj_delayed
            .forward(&Tensor::zeros((b, 1, a.dim(2)?), a.dtype(), a.device())?)?
            .squeeze(1)
    }

    /// Zero conv history `[B, S, C]` of a sequence start.
    pub fn start_history(&self, b: usize, a: &Tensor) -> Result<Tensor> {
        let s = self.k0 + self.k1 - 2;
        let c = (self.num_heads + self.num_kv_heads) * self.head_dim;
        Tensor::zeros((b, s, c), a.dtype(), a.device())
    }

    /// The projection from explicit state: `history` `[B, S, C]` and `prev_rec` `[B, Hv]`
    /// (both `None` at a sequence start). Returns the queries/keys/values and the state after
    /// the call (conv history, delayed value of the last token).
    pub fn project(
        &self,
        a: &Tensor,
        temp: &Tensor,
        conv_mask: Option<&Tensor>,
        same_document: Option<&Tensor>,
        history: Option<Tensor>,
        prev_rec: Option<Tensor>,
    ) -> Result<(Qkv, Tensor, Tensor)> {
        let a = match conv_mask {
            Some(m) => a.broadcast_mul(&m.to_dtype(a.dtype())?.unsqueeze(2)?)?,
            None => a.clone(),
        };
        let (b, t, _) = a.dims3()?;
        let (nq, nkv) = (self.num_heads, self.num_kv_heads);
        let s = self.k0 + self.k1 - 2;

        // One product where the weights allow (see `Linear::try_forward_same_input`: a
        // decode step's f32 or k-quant projections). Otherwise the values are projected
        // after the q/k work, as the layers ran before the joint product: computed up front
        // they live through it, and the medium training step's peak RSS (the heap's
        // high-water mark) rose 14.2 → 14.9 GB (the Xeon, `zaya bench --train`), above 0.8×
        // the reference's.
        let together = Linear::try_forward_same_input(
            &[
                &self.q_proj,
                &self.k_proj,
                &self.v_proj_current,
                &self.v_proj_delayed,
            ],
            &a,
        )?;
        let (q_raw, k_raw, mut values) = match together {
            Some(ys) => {
                let [q, k, vc, vd]: [Tensor; 4] = ys.try_into().map_err(|_| {
                    candle_core::Error::Msg("CCA projection: four outputs expected".into())
                })?;
                (q, k, Some((vc, vd)))
            }
            None => (self.q_proj.forward(&a)?, self.k_proj.forward(&a)?, None),
        };
        let u = Tensor::cat(&[&q_raw, &k_raw], D::Minus1)?; // [B,T,C], queries first
        let c = u.dim(2)?;

        let history = match history {
            Some(h) => h,
            None => Tensor::zeros((b, s, c), u.dtype(), u.device())?,
        };
        let x = if s > 0 {
            Tensor::cat(&[&history, &u], 1)?
        } else {
            u.clone()
        }; // [B, S+T, C]
        let z = match same_document {
            // The registry's op (fused kernel or its reference) runs both convolutions.
            None => kernels::cca_conv(
                &x,
                &self.conv_qk_depthwise_weight,
                &self.conv_qk_depthwise_bias,
                &self.conv_qk_grouped_weight,
                &self.conv_qk_grouped_bias,
                nq + nkv,
            )?,
            Some(same) => self.convolve_documents(&x, same)?,
        };

        // q/k mean residuals from the raw projections, QK-norm and the keys' temp.
        let (q, k) = kernels::cca_qk_norm(&z, &u, temp, nq, nkv)?;

        // Values: current half from this token, delayed half from the previous one.
        let (vc, vd) = match values.take() {
            Some(v) => v,
            None => (
                self.v_proj_current.forward(&a)?,
                self.v_proj_delayed.forward(&a)?,
            ),
        };
        let first = match prev_rec {
            Some(r) => r.unsqueeze(1)?,
            None => self.v_proj_delayed.forward(&Tensor::zeros(
                (b, 1, a.dim(2)?),
                a.dtype(),
                a.device(),
            )?)?,
        };
        let vdel = if t > 1 {
            Tensor::cat(&[&first, &vd.narrow(1, 0, t - 1)?], 1)?
        } else {
            first.clone()
        };
        // A document start inside a packed row takes the start-of-sequence delayed value.
        let vdel = match same_document {
            Some(same) => {
                let keep = same.narrow(2, 1, 1)?.to_dtype(vdel.dtype())?;
                let start_value = first.broadcast_as(vdel.shape())?;
                (vdel.broadcast_mul(&keep)? + start_value.broadcast_mul(&(1.0 - &keep)?)?)?
            }
            None => vdel,
        };
        let v = Tensor::cat(&[&vc, &vdel], D::Minus1)?.reshape((b, t, nkv, self.head_dim))?;

        let conv = if s > 0 {
            x.narrow(1, x.dim(1)? - s, s)?.contiguous()?
        } else {
            Tensor::zeros((b, 0, c), u.dtype(), u.device())?
        };
        let rec = vd.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?;
        Ok((Qkv { q, k, v }, conv, rec))
    }

    /// See [`convolve_documents`].
    fn convolve_documents(&self, x: &Tensor, same: &Tensor) -> Result<Tensor> {
        convolve_documents(
            x,
            same,
            &self.conv_qk_depthwise_weight,
            &self.conv_qk_depthwise_bias,
            &self.conv_qk_grouped_weight,
            &self.conv_qk_grouped_bias,
            self.num_heads + self.num_kv_heads,
        )
    }
}

/// Both causal convolutions over `x` = `[history ; u]` (`[B, S+T, C]`) of packed
/// documents: each token sees its own document's history only. Otherwise as
/// [`kernels::cca_conv`]'s reference: f32 accumulation, the depthwise output rounded to
/// the parameter dtype between the two convolutions. `w0` `[C, 1, K0]`, `w1`
/// `[C, D, K1]` over `groups` heads of `D = C / groups` channels; `same` is
/// `ForwardContext::same_document` (`[B, T, ≥ S+1]`). Public for the tensor-parallel layer,
/// which runs it on its own heads' channels.
pub fn convolve_documents(
    x: &Tensor,
    same: &Tensor,
    w0: &Tensor,
    b0: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    groups: usize,
) -> Result<Tensor> {
    let (b, len, c) = x.dims3()?;
    let (k0, k1) = (w0.dim(2)?, w1.dim(2)?);
    let s = k0 + k1 - 2;
    let t = len - s;
    let ng = groups;
    let d = c / ng;
    let xf = x.to_dtype(DType::F32)?;

    let w0 = w0.to_dtype(DType::F32)?;
    let b0 = b0.to_dtype(DType::F32)?.reshape((1, 1, c))?;
    // Grouped tap i reads the depthwise output K1-1-i tokens back; with packed documents
    // each token sees its own document's history only (other documents' inputs count as
    // the zero history of a sequence start), so the depthwise output is per (token, tap).
    let taps = (0..k1)
        .map(|i| {
            let mut acc = b0.broadcast_as((b, t, c))?.contiguous()?;
            for k in 0..k0 {
                let back = s - i - k;
                let w = w0.narrow(2, k, 1)?.reshape((1, 1, c))?;
                let keep = same.narrow(2, back, 1)?;
                acc = (acc
                    + xf.narrow(1, i + k, t)?
                        .broadcast_mul(&w)?
                        .broadcast_mul(&keep)?)?;
            }
            acc.to_dtype(x.dtype())?.to_dtype(DType::F32)
        })
        .collect::<Result<Vec<_>>>()?;
    // Grouped conv: per head a [D, K1·D] mixing of K1 consecutive taps, as one batched
    // matmul over the groups.
    let taps = taps
        .iter()
        .map(|tap| tap.reshape((b * t, ng, d)))
        .collect::<Result<Vec<_>>>()?;
    let taps = Tensor::cat(&taps, 2)?.transpose(0, 1)?.contiguous()?; // [G, B·T, K1·D]
    let w1 = w1
        .to_dtype(DType::F32)?
        .reshape((ng, d, d, k1))? // [G, out, in, K1]
        .permute((0, 3, 2, 1))? // [G, K1, in, out]
        .reshape((ng, k1 * d, d))?;
    let z = taps.matmul(&w1)?.transpose(0, 1)?.reshape((b, t, c))?;
    z.broadcast_add(&b1.to_dtype(DType::F32)?.reshape((1, 1, c))?)?
        .to_dtype(x.dtype())
}

/// The QK-norm (the registry's reference definition, also used by the tensor-parallel
/// layer).
pub use crate::kernels::reference::l2_to_sqrt_d;

/// `self_attn`.
#[derive(Debug, Clone)]
pub struct ZayaAttention {
    pub qkv_proj: CcaProjection,
    /// `qk_norm.temp`, `[Nkv]`.
    temp: Tensor,
    pub(crate) o_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

/// Per-call inputs shared by all layers of one type.
pub struct AttentionInputs<'a> {
    pub mask: &'a MaskSpec,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub conv_mask: Option<&'a Tensor>,
    /// Packed documents: `[B, T, S+1]` (see `ForwardContext::same_document`).
    pub same_document: Option<&'a Tensor>,
    pub want_probs: bool,
    pub backend: core::AttnImplementation,
}

impl ZayaAttention {
    /// Bytes of every weight of the block.
    pub fn weight_bytes(&self) -> usize {
        let p = &self.qkv_proj;
        [
            &p.q_proj,
            &p.k_proj,
            &p.v_proj_current,
            &p.v_proj_delayed,
            &self.o_proj,
        ]
        .iter()
        .map(|l| l.bytes())
        .sum::<usize>()
            + [
                &p.conv_qk_depthwise_weight,
                &p.conv_qk_depthwise_bias,
                &p.conv_qk_grouped_weight,
                &p.conv_qk_grouped_bias,
                &self.temp,
            ]
            .iter()
            .map(|t| super::tensor_bytes(t))
            .sum::<usize>()
    }

    pub fn new(cfg: &ZayaConfig, vb: Weights) -> Result<Self> {
        Ok(ZayaAttention {
            qkv_proj: CcaProjection::new(cfg, vb.pp("qkv_proj"))?,
            temp: vb.pp("qk_norm").get(cfg.num_key_value_heads, "temp")?,
            o_proj: Linear::new(
                cfg.q_dim(),
                cfg.hidden_size,
                cfg.attention_bias,
                vb.pp("o_proj"),
            )?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// One decode token for each of `B` independent rows (`a` is `[B, 1, H]`), each row with
    /// its own cache (batch 1) at its own position: the projections run batched, attention
    /// per row over that row's keys exactly as a single-row decode does. `cos`/`sin` are the
    /// rows' RoPE tables (`[B, 1, R]`).
    pub fn forward_rows(
        &self,
        a: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        window: Option<usize>,
        backend: core::AttnImplementation,
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        let (b, t, _) = a.dims3()?;
        if t != 1 || caches.len() != b {
            candle_core::bail!(
                "forward_rows takes one token per row: input [{b}, {t}], {} caches",
                caches.len()
            );
        }
        let mut history = Vec::with_capacity(b);
        let mut prev = Vec::with_capacity(b);
        for c in caches.iter() {
            match (c.conv_state(), c.recurrent_state()) {
                (Some(h), Some(r)) if c.has_previous_state() => {
                    history.push(h.clone());
                    prev.push(r.clone());
                }
                _ => {
                    history.push(self.qkv_proj.start_history(1, a)?);
                    prev.push(self.qkv_proj.start_delayed_value(1, a)?);
                }
            }
        }
        let (Qkv { q, k, v }, conv, rec) = self.qkv_proj.project(
            a,
            &self.temp,
            None,
            None,
            Some(Tensor::cat(&history, 0)?),
            Some(Tensor::cat(&prev, 0)?),
        )?;
        let q = kernels::rotary(&q.transpose(1, 2)?, cos, sin)?;
        let k = kernels::rotary(&k.transpose(1, 2)?, cos, sin)?;
        let v = v.transpose(1, 2)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut outs = Vec::with_capacity(b);
        for (row, cache) in caches.iter_mut().enumerate() {
            cache.set_cca_state(
                conv.narrow(0, row, 1)?.contiguous()?,
                rec.narrow(0, row, 1)?.contiguous()?,
            );
            let past = cache.seen();
            let held = cache.kv_len();
            let (k_all, v_all) = cache.update_kv(
                &k.narrow(0, row, 1)?.contiguous()?,
                &v.narrow(0, row, 1)?.contiguous()?,
            )?;
            let mask = MaskSpec {
                batch: 1,
                q_start: past,
                q_len: 1,
                kv_start: past - held,
                kv_len: held + 1,
                window,
                key_padding: None,
                documents: None,
            };
            let (o, _) = core::attend(
                backend,
                &q.narrow(0, row, 1)?,
                &k_all,
                &v_all,
                &mask,
                scale,
                false,
            )?;
            outs.push(o);
        }
        let o = Tensor::cat(&outs, 0)?.transpose(1, 2)?.reshape((
            b,
            1,
            self.num_heads * self.head_dim,
        ))?;
        self.o_proj.forward(&o)
    }

    /// Returns the output `[B,T,H]` and the attention probabilities when asked.
    pub fn forward(
        &self,
        a: &Tensor,
        inputs: &AttentionInputs,
        mut cache: Option<&mut LayerCache>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t, _) = a.dims3()?;
        let Qkv { q, k, v } = self.qkv_proj.forward(
            a,
            &self.temp,
            inputs.conv_mask,
            inputs.same_document,
            cache.as_deref_mut(),
        )?;
        let q = kernels::rotary(&q.transpose(1, 2)?, inputs.cos, inputs.sin)?;
        let k = kernels::rotary(&k.transpose(1, 2)?, inputs.cos, inputs.sin)?;
        let v = v.transpose(1, 2)?;
        let (k, v) = match cache {
            Some(cache) => cache.update_kv(&k.contiguous()?, &v.contiguous()?)?,
            None => (k, v),
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let (o, probs) = core::attend(
            inputs.backend,
            &q,
            &k,
            &v,
            inputs.mask,
            scale,
            inputs.want_probs,
        )?;
        let o = o
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?;
        Ok((self.o_proj.forward(&o)?, probs))
    }
}
