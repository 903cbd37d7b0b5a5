//! One decoder layer: RMSNorm → CCA attention → scaled residual merge → RMSNorm → MoE →
//! scaled residual merge, with the residual stream in f32.

use super::linear::Weights;
use candle_core::{DType, Result, Tensor};

use super::attention::{AttentionInputs, ZayaAttention};
use super::moe::{Routing, ZayaMoe};
use crate::cache::LayerCache;
use crate::config::{LayerType, ZayaConfig};
use crate::kernels;

/// `(sub + b_h) ⊙ s_h + (res + b_r) ⊙ s_r`: bias first, then scale; the sublayer term in the
/// parameter dtype, the residual term and the sum in f32.
#[derive(Debug, Clone)]
pub struct ResidualScaling {
    hidden_states_scale: Tensor,
    hidden_states_bias: Tensor,
    residual_scale: Tensor,
    residual_bias: Tensor,
}

impl ResidualScaling {
    pub fn new(h: usize, vb: Weights) -> Result<Self> {
        Ok(ResidualScaling {
            hidden_states_scale: vb.get(h, "hidden_states_scale")?,
            hidden_states_bias: vb.get(h, "hidden_states_bias")?,
            residual_scale: vb.get(h, "residual_scale")?,
            residual_bias: vb.get(h, "residual_bias")?,
        })
    }

    /// The merge through the registry's `residual_scale` kernel (fused or its reference).
    pub fn forward(&self, sub: &Tensor, residual: &Tensor) -> Result<Tensor> {
        kernels::residual_scale(
            sub,
            residual,
            &self.hidden_states_bias,
            &self.hidden_states_scale,
            &self.residual_bias,
            &self.residual_scale,
        )
    }
}

/// What a layer can report besides its output.
#[derive(Debug, Clone)]
pub struct LayerOutput {
    /// Residual stream after the layer, `[B,T,H]` f32.
    pub hidden: Tensor,
    pub routing: Routing,
    pub attention_probs: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub layer_type: LayerType,
    input_layernorm: Tensor,
    pub self_attn: ZayaAttention,
    post_attention_residual_scale: ResidualScaling,
    post_attention_layernorm: Tensor,
    pub mlp: ZayaMoe,
    post_mlp_residual_scale: ResidualScaling,
    eps: f64,
    dtype: DType,
}

impl DecoderLayer {
    /// Bytes of the layer's weights; with `one_expert`, only the largest single expert
    /// counts (what a top-1 token reads).
    pub fn weight_bytes(&self, one_expert: bool) -> usize {
        let t = super::tensor_bytes;
        let scales = |s: &ResidualScaling| {
            t(&s.hidden_states_scale)
                + t(&s.hidden_states_bias)
                + t(&s.residual_scale)
                + t(&s.residual_bias)
        };
        t(&self.input_layernorm)
            + t(&self.post_attention_layernorm)
            + scales(&self.post_attention_residual_scale)
            + scales(&self.post_mlp_residual_scale)
            + self.self_attn.weight_bytes()
            + self.mlp.weight_bytes(one_expert)
    }

    pub fn new(cfg: &ZayaConfig, layer_idx: usize, vb: Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(DecoderLayer {
            layer_type: cfg.layer_types[layer_idx],
            input_layernorm: vb.pp("input_layernorm").get(h, "weight")?,
            self_attn: ZayaAttention::new(cfg, vb.pp("self_attn"))?,
            post_attention_residual_scale: ResidualScaling::new(
                h,
                vb.pp("post_attention_residual_scale"),
            )?,
            post_attention_layernorm: vb.pp("post_attention_layernorm").get(h, "weight")?,
            mlp: ZayaMoe::new(cfg, layer_idx, vb.pp("mlp"))?,
            post_mlp_residual_scale: ResidualScaling::new(h, vb.pp("post_mlp_residual_scale"))?,
            eps: cfg.rms_norm_eps,
            dtype: vb.dtype(),
        })
    }

    /// The linear module an adapter target names.
    pub fn linear(&self, target: crate::lora::Target) -> Option<&super::Linear> {
        use crate::lora::Target as T;
        let (p, g) = (&self.self_attn.qkv_proj, &self.mlp.gate);
        Some(match target {
            T::QProj => &p.q_proj,
            T::KProj => &p.k_proj,
            T::VProjCurrent => &p.v_proj_current,
            T::VProjDelayed => &p.v_proj_delayed,
            T::OProj => &self.self_attn.o_proj,
            T::RouterDownProj => &g.down_proj,
            T::RouterFc1 => &g.fc1,
            T::RouterFc2 => &g.fc2,
            T::RouterOutProj => &g.out_proj,
            T::ExpertsGateUp | T::ExpertsDown => return None,
        })
    }

    /// Mutable access for attaching an adapter (`None` for the expert stacks, which are not
    /// linear modules).
    pub(crate) fn linear_mut(&mut self, target: crate::lora::Target) -> Option<&mut super::Linear> {
        use crate::lora::Target as T;
        let (p, g) = (&mut self.self_attn.qkv_proj, &mut self.mlp.gate);
        Some(match target {
            T::QProj => &mut p.q_proj,
            T::KProj => &mut p.k_proj,
            T::VProjCurrent => &mut p.v_proj_current,
            T::VProjDelayed => &mut p.v_proj_delayed,
            T::RouterDownProj => &mut g.down_proj,
            T::RouterFc1 => &mut g.fc1,
            T::RouterFc2 => &mut g.fc2,
            T::RouterOutProj => &mut g.out_proj,
            T::OProj => &mut self.self_attn.o_proj,
            T::ExpertsGateUp | T::ExpertsDown => return None,
        })
    }

    /// One decode token for each of `B` rows with their own caches (see
    /// [`ZayaAttention::forward_rows`]); returns the new residual stream and the router state.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_rows(
        &self,
        h: &Tensor,
        router_state: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
        window: Option<usize>,
        backend: crate::attention::AttnImplementation,
        caches: &mut [&mut LayerCache],
    ) -> Result<(Tensor, Tensor)> {
        let a = kernels::rms_norm(
            &kernels::to_dtype(h, self.dtype)?,
            &self.input_layernorm,
            self.eps,
        )?;
        let attn = self
            .self_attn
            .forward_rows(&a, cos, sin, window, backend, caches)?;
        let r = self.post_attention_residual_scale.forward(&attn, h)?;
        let n = kernels::rms_norm(
            &kernels::to_dtype(&r, self.dtype)?,
            &self.post_attention_layernorm,
            self.eps,
        )?;
        let (m, routing) = self.mlp.forward(&n, router_state)?;
        Ok((self.post_mlp_residual_scale.forward(&m, &r)?, routing.state))
    }

    /// `h` is the f32 residual stream, `router_state` the previous layer's `ρ` (none for
    /// layer 0). The new `ρ` is `output.routing.state`.
    pub fn forward(
        &self,
        h: &Tensor,
        router_state: Option<&Tensor>,
        inputs: &AttentionInputs,
        cache: Option<&mut LayerCache>,
    ) -> Result<LayerOutput> {
        let a = kernels::rms_norm(
            &kernels::to_dtype(h, self.dtype)?,
            &self.input_layernorm,
            self.eps,
        )?;
        let (attn, attention_probs) = self.self_attn.forward(&a, inputs, cache)?;
        let r = self.post_attention_residual_scale.forward(&attn, h)?;
        let n = kernels::rms_norm(
            &kernels::to_dtype(&r, self.dtype)?,
            &self.post_attention_layernorm,
            self.eps,
        )?;
        let (m, routing) = self.mlp.forward(&n, router_state)?;
        let hidden = self.post_mlp_residual_scale.forward(&m, &r)?;
        Ok(LayerOutput {
            hidden,
            routing,
            attention_probs,
        })
    }
}
