//! `zaya quantize` (a checkpoint directory → one GGUF file) and `zaya eval` (perplexity,
//! KL divergence and top-1 agreement against a reference model on held-out text).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

use zaya::gguf;
use zaya::quant::{QuantPlan, WeightFormat};
use zaya::text::ZayaTokenizer;
use zaya::{ForwardOptions, ZayaModel};

/// Which format each class of tensor gets.
#[derive(clap::Args, Clone, Debug)]
pub struct PlanArgs {
    /// Format of every quantizable tensor (attention projections, experts, embedding,
    /// lm_head): q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1, q4_0, q3_k, q2_k, f16, bf16, f32
    /// or keep; or a mix as llama.cpp's: q4_k_m / q5_k_m (q4_k / q5_k, with the embedding
    /// and lm_head in q6_k, and q6_k for the value projections and the experts' down_proj
    /// of the first and last eighth of the layers and every third layer between). Norms,
    /// scales, biases, the router, CCA convolutions, `temp` and the balancing biases always
    /// stay dense.
    #[arg(long, default_value = "q8_0")]
    pub format: String,
    /// Format of the token embedding (default: --format). On a tied model this is the
    /// lookup table's: where it differs from the head's format (--head-format, or the
    /// mix's), the file stores the head apart (an untied model whose lm_head is rounded
    /// from the tied weight), e.g. `--embed-format keep` keeps every looked-up row exact
    /// while the head's product reads the quantized copy. In a mix, the mix's base format
    /// counts as not given (the tied embedding follows the head).
    #[arg(long)]
    pub embed_format: Option<String>,
    /// Format of the lm_head (default: --format; q6_k in the mixes, where a tied
    /// embedding follows it unless --embed-format is given).
    #[arg(long)]
    pub head_format: Option<String>,
    /// Format of the experts (default: --format).
    #[arg(long)]
    pub expert_format: Option<String>,
    /// Format of the attention projections (default: --format).
    #[arg(long)]
    pub attn_format: Option<String>,
    /// Format of the router's linear layers (default: keep).
    #[arg(long)]
    pub router_format: Option<String>,
    /// `PATTERN=FORMAT` on native tensor names (`*` wildcard), applied after the classes,
    /// last match wins; repeatable. Example: `--rule 'model.layers.0.*=q8_0'`.
    #[arg(long)]
    pub rule: Vec<String>,
}

impl PlanArgs {
    pub fn plan(&self) -> Result<QuantPlan> {
        let mut plan = QuantPlan::named(&self.format)?;
        let pick = |o: &Option<String>, d: WeightFormat| -> Result<WeightFormat> {
            Ok(match o {
                Some(s) => s.parse()?,
                None => d,
            })
        };
        plan.embedding = pick(&self.embed_format, plan.embedding)?;
        plan.lm_head = pick(&self.head_format, plan.lm_head)?;
        plan.expert = pick(&self.expert_format, plan.expert)?;
        plan.attention = pick(&self.attn_format, plan.attention)?;
        plan.router = pick(&self.router_format, WeightFormat::Keep)?;
        for r in &self.rule {
            plan.rules.push(QuantPlan::parse_rule(r)?);
        }
        Ok(plan)
    }
}

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// Checkpoint directory (either layout; tokenizer files are carried along; default:
    /// the embedded default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The GGUF file to write.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Calibration text (UTF-8): run the model over it first and weigh each weight's
    /// rounding error by the mean square of its input feature (an importance matrix; used
    /// by the k-quants, q4_0 and q5_0). A `.safetensors` file is taken as a matrix saved
    /// by `--imatrix-out`.
    #[arg(long)]
    pub imatrix: Option<PathBuf>,
    /// Also save the importance matrix computed from the text here (a `.safetensors`
    /// file to pass to `--imatrix` next time).
    #[arg(long, requires = "imatrix")]
    pub imatrix_out: Option<PathBuf>,
    /// Calibration text (UTF-8) for GPTQ: run the model over it, keep every quantized
    /// product's input moments (`XᵀX`, per expert for the experts) and choose each
    /// weight's levels so that the layer's outputs on such inputs stay close (GPTQ, in
    /// order of input energy), on the block scales the plain (or `--imatrix`) quantizer
    /// picked: the file is an ordinary GGUF. Formats: q8_0, q6_k, q5_k, q5_1, q5_0, q4_k,
    /// q4_1, q4_0 (others quantize as usual); not a tied token embedding, whose rows are
    /// also looked up (its head is, when stored apart: see --embed-format). Without
    /// --imatrix, the moments' diagonals (the same mean squares) weigh the block scales. The calibration options below shape this pass too.
    #[arg(long)]
    pub gptq: Option<PathBuf>,
    /// Collect GPTQ's input moments one decoder layer at a time (one calibration pass per
    /// layer, the memory of one layer's moments). Chosen by itself when all layers' do
    /// not fit beside the calibrating model.
    #[arg(long, requires = "gptq")]
    pub gptq_per_layer: bool,
    /// Tokens per calibration window (--imatrix text or --gptq) [default: 512].
    #[arg(long, visible_alias = "calibration-context")]
    pub imatrix_context: Option<usize>,
    /// Stop calibrating after this many tokens [default: the whole text].
    #[arg(long, visible_alias = "calibration-tokens")]
    pub imatrix_tokens: Option<usize>,
    /// Directory with the tokenizer for the calibration text (default: --model).
    #[arg(long, visible_alias = "calibration-tokenizer")]
    pub imatrix_tokenizer: Option<PathBuf>,
}

pub fn run_quantize(args: QuantizeArgs) -> Result<()> {
    let plan = args.plan.plan()?;
    let model = match &args.model {
        Some(p) => p.clone(),
        None => crate::default_model::dir()?,
    };
    let t0 = Instant::now();
    let mut calibration = serde_json::Value::Null;
    let saved = |p: &PathBuf| p.extension().is_some_and(|e| e == "safetensors");
    let calibrating = [
        (
            "--imatrix-context / --calibration-context",
            args.imatrix_context.is_some(),
        ),
        (
            "--imatrix-tokens / --calibration-tokens",
            args.imatrix_tokens.is_some(),
        ),
        (
            "--imatrix-tokenizer / --calibration-tokenizer",
            args.imatrix_tokenizer.is_some(),
        ),
    ];
    let text_given = args.gptq.is_some() || args.imatrix.as_ref().is_some_and(|p| !saved(p));
    if let Some((flag, _)) = calibrating.iter().find(|(_, given)| *given) {
        if !text_given {
            bail!("{flag} needs a calibration text (--imatrix TEXT or --gptq TEXT)");
        }
    }
    if args.imatrix_out.is_some() && args.imatrix.as_ref().is_some_and(saved) {
        bail!("--imatrix-out needs --imatrix with a calibration text, not a saved matrix");
    }
    let windows = |tok: &ZayaTokenizer| zaya::imatrix::Calibration {
        context: args.imatrix_context.unwrap_or(512),
        max_tokens: args.imatrix_tokens.unwrap_or(0),
        bos: tok.bos_token_id(),
    };
    let calibration_ids = |path: &PathBuf| -> Result<(ZayaTokenizer, Vec<u32>)> {
        let tok = ZayaTokenizer::from_dir(args.imatrix_tokenizer.as_ref().unwrap_or(&model))?;
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        let ids = tok.encode(&text, false)?;
        Ok((tok, ids))
    };
    let imatrix = match &args.imatrix {
        Some(path) if saved(path) => {
            let m = zaya::imatrix::load(path)?;
            calibration = serde_json::json!({ "matrix": path, "tensors": m.len() });
            Some(m)
        }
        Some(path) => {
            let (tok, ids) = calibration_ids(path)?;
            let (m, tokens) = zaya::imatrix::importance_matrix(&model, &ids, windows(&tok))?;
            calibration = serde_json::json!({
                "text": path,
                "tokens": tokens,
                "tensors": m.len(),
                "seconds": t0.elapsed().as_secs_f64(),
            });
            if let Some(out) = &args.imatrix_out {
                zaya::imatrix::save(&m, out)?;
                calibration["saved"] = serde_json::json!(out);
            }
            Some(m)
        }
        None => None,
    };
    let mut gptq_calibration = serde_json::Value::Null;
    let mut moments = match &args.gptq {
        Some(path) => {
            let (tok, ids) = calibration_ids(path)?;
            let cfg = zaya::weights::Checkpoint::open(&model)?.config()?;
            if !zaya::gptq::rounds_any(&plan, &cfg) {
                bail!(
                    "--gptq: no tensor of this plan is stored in a format GPTQ handles \
                     (q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1, q4_0)"
                );
            }
            if imatrix.is_none() {
                // GPTQ's moments hold the importance matrix on their diagonals: the
                // block scales are weighed with it (one calibration pass for both)
                calibration = serde_json::json!({ "from": "--gptq moments" });
            }
            Some(zaya::gptq::Moments::collect(
                &model,
                &ids,
                windows(&tok),
                &plan,
                args.gptq_per_layer,
            )?)
        }
        None => None,
    };
    let t1 = Instant::now();
    let report =
        gguf::quantize_to_gguf(&model, &args.out, &plan, imatrix.as_ref(), moments.as_mut())?;
    if let Some(m) = &moments {
        gptq_calibration = serde_json::json!({
            "text": args.gptq,
            "tokens": m.tokens(),
            "per_layer": m.per_layer(),
            "passes": m.passes(),
            "seconds_writing": t1.elapsed().as_secs_f64(),
        });
    }
    if moments.is_some() {
        for (name, _) in report.gptq.iter().filter(|(_, m)| *m == 0) {
            eprintln!(
                "note: {name}: GPTQ rounded none of its matrices (the calibration reached \
                 none with as many tokens as it has input features); plain rounding"
            );
        }
        gptq_calibration["rounded"] = serde_json::json!(report
            .gptq
            .iter()
            .filter(|(_, m)| *m > 0)
            .map(|(n, m)| (n.clone(), serde_json::json!(m)))
            .collect::<serde_json::Map<_, _>>());
    }
    for (name, requested, got) in report.fallbacks() {
        eprintln!(
            "note: {name}: rows do not fit {requested} blocks, stored as {}",
            zaya::quant::ggml_name(got)
        );
    }
    let summary: serde_json::Map<String, serde_json::Value> = report
        .summary()
        .into_iter()
        .map(|(k, (n, b))| (k, serde_json::json!({"tensors": n, "bytes": b})))
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "out": args.out,
            "bytes": report.bytes,
            "seconds": t0.elapsed().as_secs_f64(),
            "formats": summary,
            "imatrix": calibration,
            "gptq": gptq_calibration,
        })
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Model directory or GGUF file to evaluate (default: the embedded default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Quantize while loading (as `--format` of `zaya quantize`).
    #[arg(long)]
    pub quant: Option<String>,
    /// Dense weight dtype of the evaluated model: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Held-out text (UTF-8).
    #[arg(long)]
    pub text: PathBuf,
    /// Reference model (run in f32); default: `--model` itself in f32 without `--quant`
    /// (a GGUF model needs an explicit reference).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Tokens per window (each window starts a fresh context; BOS first).
    #[arg(long, default_value_t = 256)]
    pub context: usize,
    /// Stop after this many scored tokens (0: the whole text).
    #[arg(long, default_value_t = 0)]
    pub max_tokens: usize,
}

/// Quality numbers of one evaluation.
#[derive(Debug, Default, serde::Serialize)]
pub struct EvalReport {
    pub tokens: usize,
    pub perplexity: f64,
    pub reference_perplexity: f64,
    pub mean_kl: f64,
    /// Median of the per-position KL: what a typical token sees.
    pub kl_median: f64,
    /// 99th percentile and largest per-position KL.
    pub kl_p99: f64,
    pub kl_max: f64,
    /// Share of the summed KL held by the 1 % of positions with the largest KL: near 1 %
    /// when the error is spread evenly, large when a few positions (e.g. a token routed to
    /// another expert) carry the mean.
    pub kl_top1pct_share: f64,
    /// Share of positions at which some layer's router chose another expert (or the skip)
    /// than the reference's did, and the share of the summed KL those positions hold.
    pub rerouted: f64,
    pub rerouted_kl_share: f64,
    pub top1_agreement: f64,
    pub weight_bytes: usize,
    pub bytes_per_token: usize,
}

pub fn run_eval(args: EvalArgs) -> Result<()> {
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => crate::default_model::dir()?,
    };
    let dtype = crate::parse_dtype(&args.dtype)?;
    let plan = match &args.quant {
        Some(f) => Some(QuantPlan::named(f)?),
        None => None,
    };
    let reference_path = match &args.reference {
        Some(p) => p.clone(),
        None if gguf::is_gguf(&model_path) => {
            bail!("--reference DIR is needed to evaluate a GGUF file")
        }
        None => model_path.clone(),
    };
    let dev = Device::Cpu;
    let model = ZayaModel::load_quantized(&model_path, dtype, &dev, plan.as_ref())?;
    let reference = ZayaModel::load(&reference_path, DType::F32, &dev)?;
    let tok = ZayaTokenizer::from_dir(&model_path)?;
    let text =
        std::fs::read_to_string(&args.text).with_context(|| format!("{}", args.text.display()))?;
    let ids = tok.encode(&text, false)?;
    if args.context < 2 {
        bail!("--context must be at least 2");
    }
    let bos = tok.bos_token_id();
    let t0 = Instant::now();
    let report = evaluate(&model, &reference, &ids, bos, args.context, args.max_tokens)?;
    let mut v = serde_json::to_value(&report)?;
    v["model"] = serde_json::json!(model_path);
    v["reference"] = serde_json::json!(reference_path);
    v["quant"] = serde_json::json!(args.quant);
    v["seconds"] = serde_json::json!(t0.elapsed().as_secs_f64());
    println!("{v}");
    Ok(())
}

/// Scores `ids` in windows of `context` tokens (BOS prepended when the tokenizer has one):
/// perplexity of both models, mean KL(reference ‖ model) of the next-token distributions
/// and how often their argmax agrees, over every predicted position.
pub fn evaluate(
    model: &ZayaModel,
    reference: &ZayaModel,
    ids: &[u32],
    bos: Option<u32>,
    context: usize,
    max_tokens: usize,
) -> Result<EvalReport> {
    let body = context - usize::from(bos.is_some());
    let (mut nll, mut ref_nll, mut agree, mut n) = (0f64, 0f64, 0usize, 0usize);
    let mut kls: Vec<f64> = Vec::with_capacity(ids.len());
    let mut rerouted: Vec<bool> = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(body) {
        if max_tokens > 0 && n >= max_tokens {
            break;
        }
        let window: Vec<u32> = bos.into_iter().chain(chunk.iter().copied()).collect();
        if window.len() < 2 {
            continue;
        }
        let input = Tensor::new(window.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logp = |m: &ZayaModel| -> Result<(Tensor, Vec<Vec<u32>>)> {
            let out = m.forward(&input, None, &ForwardOptions::default())?;
            let logits = out
                .logits
                .context("no logits")?
                .squeeze(0)?
                .to_dtype(DType::F32)?;
            let choices = out.routing.into_iter().map(|r| r.choice).collect();
            Ok((log_softmax(&logits)?, choices))
        };
        let (lq, routes_q) = logp(model)?;
        let (lp, routes_p) = logp(reference)?;
        let t = window.len() - 1;
        if routes_q.len() != routes_p.len() {
            bail!(
                "the model has {} layers and the reference {}: not the same architecture",
                routes_q.len(),
                routes_p.len()
            );
        }
        rerouted.extend((0..t).map(|i| {
            routes_q
                .iter()
                .zip(&routes_p)
                .any(|(q, p)| q.get(i) != p.get(i))
        }));
        let lq = lq.narrow(0, 0, t)?;
        let lp = lp.narrow(0, 0, t)?;
        let target = Tensor::new(&window[1..], &Device::Cpu)?.unsqueeze(1)?;
        nll -= lq.gather(&target, 1)?.sum_all()?.to_scalar::<f32>()? as f64;
        ref_nll -= lp.gather(&target, 1)?.sum_all()?.to_scalar::<f32>()? as f64;
        // KL(p ‖ q) = Σ p (log p − log q), per position.
        let per_position = (lp.exp()? * (&lp - &lq)?)?.sum(D::Minus1)?;
        kls.extend(per_position.to_vec1::<f32>()?.into_iter().map(f64::from));
        let aq = lq.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let ap = lp.argmax(D::Minus1)?.to_vec1::<u32>()?;
        agree += aq.iter().zip(&ap).filter(|(a, b)| a == b).count();
        n += t;
    }
    if n == 0 {
        bail!("the text has no tokens to score");
    }
    let nf = n as f64;
    let kl: f64 = kls.iter().sum();
    let rerouted_kl: f64 = kls
        .iter()
        .zip(&rerouted)
        .filter(|(_, &r)| r)
        .map(|(k, _)| k)
        .sum();
    let rerouted_share = rerouted.iter().filter(|&&r| r).count() as f64 / nf;
    kls.sort_by(f64::total_cmp);
    let at = |q: f64| kls[((kls.len() - 1) as f64 * q).round() as usize];
    let top = kls.len().div_ceil(100);
    let top_sum: f64 = kls[kls.len() - top..].iter().sum();
    Ok(EvalReport {
        tokens: n,
        perplexity: (nll / nf).exp(),
        reference_perplexity: (ref_nll / nf).exp(),
        mean_kl: kl / nf,
        kl_median: at(0.5),
        kl_p99: at(0.99),
        kl_max: kls[kls.len() - 1],
        kl_top1pct_share: if kl > 0.0 { top_sum / kl } else { 0.0 },
        rerouted: rerouted_share,
        rerouted_kl_share: if kl > 0.0 { rerouted_kl / kl } else { 0.0 },
        top1_agreement: agree as f64 / nf,
        weight_bytes: model.weight_bytes(),
        bytes_per_token: model.bytes_per_token(),
    })
}

/// Row-wise `log softmax` of `[T, V]` f32 logits (max-shifted).
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}
