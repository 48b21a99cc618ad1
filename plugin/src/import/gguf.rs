//! `leaf model import-gguf`: a llama.cpp GGUF file to a Hugging Face Llama model directory.
//!
//! The file is read with candle's GGUF reader (`candle_core::quantized::gguf_file`) and every
//! tensor dequantised to f32 by candle. What llama.cpp's `convert_hf_to_gguf.py` did to a
//! Hugging Face checkpoint is undone:
//! - the names (`blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, ...);
//! - the row permutation of the query and key projections: llama.cpp applies RoPE to adjacent
//!   pairs of a head's rows, Hugging Face to its two halves, so the converter reorders each
//!   head's rows from `[half 0 | half 1]` to interleaved pairs (`LlamaModel.permute`). The
//!   inverse regroups each head's rows `(head, i, pair)` as `(head, pair, i)`;
//! - a missing `output.weight` means tied embeddings (`tie_word_embeddings: true`).
//!
//! Only the `llama` architecture (which llama.cpp also uses for Mistral-style and SmolLM
//! models) without RoPE scaling and without experts is imported; anything else is refused with
//! the reason, as is any tensor the Llama layout does not have.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use serde::Serialize;
use serde_json::json;

use super::tokenizer::{build_tokenizer, tokenizer_config, GgufVocab};
use super::ImportError;

/// The architectures leaf imports.
pub const SUPPORTED_ARCHITECTURES: &str = "llama";

/// The tensor types leaf dequantises (candle's CPU dequantisation).
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, \
     Q4_K, Q5_K, Q6_K";

/// What [`import_gguf`] wrote.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct ImportSummary {
    /// The GGUF file.
    pub file: PathBuf,
    /// The model directory written.
    pub out: PathBuf,
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`, when present.
    pub name: Option<String>,
    /// Decoder layers.
    pub layers: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Whether the LM head is the embedding matrix.
    pub tied_embeddings: bool,
    /// Parameters written.
    pub parameters: usize,
    /// Tensors per GGML type in the file, e.g. `{"Q4_1": 210, "F32": 61, "Q8_0": 1}`.
    pub tensor_types: BTreeMap<String, usize>,
    /// Wall time of the import, seconds.
    pub seconds: f64,
}

/// The hyper-parameters of a GGUF Llama model.
#[derive(Debug, Clone, PartialEq)]
struct Hyper {
    layers: usize,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    kv_heads: usize,
    context: usize,
    rms_eps: f64,
    rope_theta: f64,
}

impl Hyper {
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

struct Meta<'a> {
    path: &'a Path,
    map: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn err(&self, key: &str, reason: impl Into<String>) -> ImportError {
        ImportError::Metadata {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    fn int(&self, key: &str) -> Result<Option<i64>, ImportError> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        int_of(v)
            .map(Some)
            .ok_or_else(|| self.err(key, format!("expected an integer, found {v:?}")))
    }

    fn usize(&self, key: &str) -> Result<Option<usize>, ImportError> {
        match self.int(key)? {
            None => Ok(None),
            Some(i) if i > 0 => Ok(Some(i as usize)),
            Some(i) => Err(self.err(key, format!("must be positive, found {i}"))),
        }
    }

    fn required(&self, key: &str) -> Result<usize, ImportError> {
        self.usize(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    fn float(&self, key: &str) -> Result<Option<f64>, ImportError> {
        match self.map.get(key) {
            None => Ok(None),
            // The shortest decimal of the f32 (1e-5, not 9.999999747378752e-6).
            Some(Value::F32(x)) => Ok(Some(x.to_string().parse().unwrap_or(*x as f64))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.err(key, format!("expected a float, found {v:?}"))),
        }
    }

    fn string(&self, key: &str) -> Result<Option<&str>, ImportError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, format!("expected a string, found {v:?}"))),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ImportError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected a bool, found {v:?}"))),
        }
    }

    fn id(&self, key: &str) -> Result<Option<u32>, ImportError> {
        match self.int(key)? {
            None => Ok(None),
            Some(i) => u32::try_from(i)
                .map(Some)
                .map_err(|_| self.err(key, format!("{i} is not a token id"))),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&Vec<Value>>, ImportError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.err(key, format!("expected an array, found {v:?}"))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, ImportError> {
        let a = self.array(key)?.ok_or_else(|| self.err(key, "missing"))?;
        a.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(self.err(key, format!("entry {i} is not a string: {other:?}"))),
            })
            .collect()
    }
}

fn int_of(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn dtype_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

fn dtype_supported(t: GgmlDType) -> bool {
    // Q8_1 and Q8_K are llama.cpp's intermediate types for dot products, never a storage type.
    !matches!(t, GgmlDType::Q8_1 | GgmlDType::Q8K)
}

fn hyper(meta: &Meta<'_>, arch: &str) -> Result<Hyper, ImportError> {
    let k = |s: &str| format!("{arch}.{s}");
    for key in ["expert_count", "expert_used_count"] {
        if meta.int(&k(key))?.is_some_and(|n| n > 0) {
            return Err(meta.err(
                &k(key),
                "mixture-of-experts models are not supported (no experts allowed)",
            ));
        }
    }
    if let Some(kind) = meta.string(&k("rope.scaling.type"))? {
        if kind != "none" {
            return Err(meta.err(
                &k("rope.scaling.type"),
                format!("RoPE scaling {kind:?} is not supported (only none)"),
            ));
        }
    }
    let heads = meta.required(&k("attention.head_count"))?;
    let hidden = meta.required(&k("embedding_length"))?;
    let h = Hyper {
        layers: meta.required(&k("block_count"))?,
        hidden,
        intermediate: meta.required(&k("feed_forward_length"))?,
        heads,
        kv_heads: meta.usize(&k("attention.head_count_kv"))?.unwrap_or(heads),
        context: meta.usize(&k("context_length"))?.unwrap_or(2048),
        rms_eps: meta
            .float(&k("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| meta.err(&k("attention.layer_norm_rms_epsilon"), "missing"))?,
        rope_theta: meta.float(&k("rope.freq_base"))?.unwrap_or(10_000.0),
    };
    if !h.hidden.is_multiple_of(h.heads) || !h.heads.is_multiple_of(h.kv_heads) {
        return Err(meta.err(
            &k("attention.head_count"),
            format!(
                "{} heads ({} key/value heads) do not divide the width {}",
                h.heads, h.kv_heads, h.hidden
            ),
        ));
    }
    if !h.head_dim().is_multiple_of(2) {
        return Err(meta.err(
            &k("attention.head_count"),
            format!("the head width {} is odd", h.head_dim()),
        ));
    }
    if let Some(rot) = meta.usize(&k("rope.dimension_count"))? {
        if rot != h.head_dim() {
            return Err(meta.err(
                &k("rope.dimension_count"),
                format!(
                    "partial rotary embeddings ({rot} of {} dims) are not supported",
                    h.head_dim()
                ),
            ));
        }
    }
    if meta
        .usize(&k("attention.key_length"))?
        .unwrap_or(h.head_dim())
        != h.head_dim()
        || meta
            .usize(&k("attention.value_length"))?
            .unwrap_or(h.head_dim())
            != h.head_dim()
    {
        return Err(meta.err(
            &k("attention.key_length"),
            "a head width other than embedding_length / head_count is not supported",
        ));
    }
    Ok(h)
}

fn vocab(meta: &Meta<'_>) -> Result<GgufVocab, ImportError> {
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let token_types = match meta.array("tokenizer.ggml.token_type")? {
        None => vec![1; tokens.len()],
        Some(a) => a
            .iter()
            .map(|v| {
                int_of(v).ok_or_else(|| {
                    meta.err(
                        "tokenizer.ggml.token_type",
                        format!("{v:?} is not an integer"),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let merges = match meta.array("tokenizer.ggml.merges")? {
        None => Vec::new(),
        Some(_) => meta.strings("tokenizer.ggml.merges")?,
    };
    Ok(GgufVocab {
        model: meta
            .string("tokenizer.ggml.model")?
            .ok_or_else(|| meta.err("tokenizer.ggml.model", "missing"))?
            .to_string(),
        pre: meta.string("tokenizer.ggml.pre")?.map(str::to_string),
        tokens,
        token_types,
        merges,
        bos: meta.id("tokenizer.ggml.bos_token_id")?,
        eos: meta.id("tokenizer.ggml.eos_token_id")?,
        unk: meta.id("tokenizer.ggml.unknown_token_id")?,
        pad: meta.id("tokenizer.ggml.padding_token_id")?,
        add_bos: meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
        chat_template: meta.string("tokenizer.chat_template")?.map(str::to_string),
    })
}

/// The Hugging Face name of a GGUF tensor, and whether its rows carry llama.cpp's RoPE
/// permutation (`Some(heads)`: the number of heads to undo it over).
fn hf_name(gguf: &str, h: &Hyper) -> Option<(String, Option<usize>)> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some((t.to_string(), None));
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer_str, module) = rest.split_once('.')?;
    let layer: usize = layer_str.parse().ok()?;
    if layer >= h.layers || layer.to_string() != layer_str {
        return None;
    }
    let (hf, heads) = match module {
        "attn_norm.weight" => ("input_layernorm.weight", None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", None),
        "attn_q.weight" => ("self_attn.q_proj.weight", Some(h.heads)),
        "attn_k.weight" => ("self_attn.k_proj.weight", Some(h.kv_heads)),
        "attn_v.weight" => ("self_attn.v_proj.weight", None),
        "attn_output.weight" => ("self_attn.o_proj.weight", None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", None),
        "ffn_up.weight" => ("mlp.up_proj.weight", None),
        "ffn_down.weight" => ("mlp.down_proj.weight", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}"), heads))
}

/// The Hugging Face shape of a tensor.
fn hf_shape(hf: &str, h: &Hyper, vocab: usize) -> Vec<usize> {
    let (d, i, kv) = (h.hidden, h.intermediate, h.kv_heads * h.head_dim());
    let module = hf.rsplit('.').nth(1).unwrap_or("");
    match module {
        "embed_tokens" | "lm_head" => vec![vocab, d],
        "norm" | "input_layernorm" | "post_attention_layernorm" => vec![d],
        "q_proj" | "o_proj" => vec![d, d],
        "k_proj" | "v_proj" => vec![kv, d],
        "gate_proj" | "up_proj" => vec![i, d],
        "down_proj" => vec![d, i],
        _ => vec![],
    }
}

/// Undoes llama.cpp's RoPE row permutation of a `(heads * head_dim, in)` projection: rows
/// `(head, i, pair)` (interleaved pairs) go back to `(head, pair, i)` (two halves).
pub fn unpermute_rope_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if heads == 0 || !out.is_multiple_of(2 * heads) {
        candle_core::bail!("{out} rows cannot be split into {heads} heads of pairs");
    }
    w.reshape((heads, out / heads / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// llama.cpp's permutation (`LlamaModel.permute` of `convert_hf_to_gguf.py`), the inverse of
/// [`unpermute_rope_rows`]; used by the tests to write GGUF files from Hugging Face weights.
pub fn permute_rope_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if heads == 0 || !out.is_multiple_of(2 * heads) {
        candle_core::bail!("{out} rows cannot be split into {heads} heads of pairs");
    }
    w.reshape((heads, 2, out / heads / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// Imports the GGUF file `file` into a new Hugging Face model directory `out` (which must not
/// exist, or be empty). The directory is assembled next to `out` and renamed into place, so a
/// failed import leaves nothing behind.
pub fn import_gguf(file: &Path, out: &Path) -> Result<ImportSummary, ImportError> {
    let span = tracing::info_span!("import_gguf", file = %file.display());
    let _guard = span.enter();
    let start = Instant::now();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImportError::Io { path, source }
    };
    if out.exists() {
        let empty = out.is_dir() && std::fs::read_dir(out).map_err(io(out))?.next().is_none();
        if !empty {
            return Err(ImportError::Output {
                path: out.to_path_buf(),
                reason: "exists and is not an empty directory".into(),
            });
        }
    }
    let mut reader = BufReader::new(File::open(file).map_err(io(file))?);
    let content = Content::read(&mut reader).map_err(|e| ImportError::Format {
        path: file.to_path_buf(),
        reason: format!("{e} (leaf imports tensors of types {SUPPORTED_TYPES})"),
    })?;
    let meta = Meta {
        path: file,
        map: &content.metadata,
    };
    let arch = meta
        .string("general.architecture")?
        .ok_or_else(|| meta.err("general.architecture", "missing"))?
        .to_string();
    if arch != "llama" {
        return Err(ImportError::Architecture {
            path: file.to_path_buf(),
            architecture: arch,
            supported: SUPPORTED_ARCHITECTURES,
        });
    }
    // Every tensor in a supported type, before anything else is looked at.
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensor_types = BTreeMap::new();
    for name in &names {
        let info = &content.tensor_infos[name.as_str()];
        if !dtype_supported(info.ggml_dtype) {
            return Err(ImportError::TensorType {
                path: file.to_path_buf(),
                tensor: name.to_string(),
                dtype: dtype_name(info.ggml_dtype).into(),
                supported: SUPPORTED_TYPES,
            });
        }
        *tensor_types
            .entry(dtype_name(info.ggml_dtype).to_string())
            .or_insert(0) += 1;
    }
    let h = hyper(&meta, &arch)?;
    let vocab = vocab(&meta)?;
    let tensor_err = |tensor: &str, reason: String| ImportError::Tensor {
        path: file.to_path_buf(),
        tensor: tensor.to_string(),
        reason,
    };

    // Every tensor: a Llama name, and all of them present.
    let mut plan = Vec::with_capacity(names.len());
    for name in &names {
        let (hf, heads) = hf_name(name, &h).ok_or_else(|| {
            tensor_err(
                name,
                "not part of the Llama layout leaf imports (no biases, no RoPE frequency \
                 tables, no experts)"
                    .into(),
            )
        })?;
        plan.push((name.to_string(), hf, heads));
    }
    let embed = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| tensor_err("token_embd.weight", "missing".into()))?;
    let vocab_size = embed.shape.dims().first().copied().unwrap_or(0);
    if let Some(n) = meta.usize(&format!("{arch}.vocab_size"))? {
        if n != vocab_size {
            return Err(meta.err(
                &format!("{arch}.vocab_size"),
                format!("{n} but the embedding has {vocab_size} rows"),
            ));
        }
    }
    if vocab.tokens.len() > vocab_size {
        return Err(meta.err(
            "tokenizer.ggml.tokens",
            format!(
                "{} tokens but the embedding has only {vocab_size} rows",
                vocab.tokens.len()
            ),
        ));
    }
    let tied = !content.tensor_infos.contains_key("output.weight");
    let mut want: Vec<String> = vec!["token_embd.weight".into(), "output_norm.weight".into()];
    if !tied {
        want.push("output.weight".into());
    }
    for l in 0..h.layers {
        for m in [
            "attn_norm",
            "ffn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            want.push(format!("blk.{l}.{m}.weight"));
        }
    }
    if let Some(missing) = want
        .iter()
        .find(|n| !content.tensor_infos.contains_key(n.as_str()))
    {
        return Err(tensor_err(missing, "missing".into()));
    }

    // The tokenizer first: cheap, and it refuses what it cannot rebuild before the heavy part.
    let tokenizer = build_tokenizer(&vocab).map_err(|reason| ImportError::Tokenizer {
        path: file.to_path_buf(),
        reason,
    })?;
    let tok_config =
        tokenizer_config(&vocab, h.context).map_err(|reason| ImportError::Tokenizer {
            path: file.to_path_buf(),
            reason,
        })?;

    // Dequantise, rename, un-permute, check shapes.
    let cand = |source| ImportError::Tensors {
        path: file.to_path_buf(),
        source,
    };
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(plan.len());
    let mut parameters = 0usize;
    for (name, hf, heads) in plan {
        let q = content
            .tensor(&mut reader, &name, &Device::Cpu)
            .map_err(|e| tensor_err(&name, format!("cannot read: {e}")))?;
        let mut t = q
            .dequantize(&Device::Cpu)
            .map_err(cand)?
            .to_dtype(candle_core::DType::F32)
            .map_err(cand)?;
        let shape = hf_shape(&hf, &h, vocab_size);
        if t.dims() != shape.as_slice() {
            return Err(tensor_err(
                &name,
                format!("shape {:?}, expected {shape:?} ({hf})", t.dims()),
            ));
        }
        if let Some(heads) = heads {
            t = unpermute_rope_rows(&t, heads).map_err(cand)?;
        }
        parameters += t.elem_count();
        tensors.push((hf, t));
    }
    drop(reader);

    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": h.hidden,
        "intermediate_size": h.intermediate,
        "num_hidden_layers": h.layers,
        "num_attention_heads": h.heads,
        "num_key_value_heads": h.kv_heads,
        "head_dim": h.head_dim(),
        "rms_norm_eps": h.rms_eps,
        "rope_theta": h.rope_theta,
        "rope_scaling": null,
        "max_position_embeddings": h.context,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": vocab.bos,
        "eos_token_id": vocab.eos,
        "pad_token_id": vocab.pad,
        "torch_dtype": "float32",
        "use_cache": true,
    });
    let generation = json!({
        "bos_token_id": vocab.bos,
        "eos_token_id": vocab.eos,
        "pad_token_id": vocab.pad,
    });

    // Assemble next to `out`, then rename into place.
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let stem = out
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{stem}.importing-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let written = write_dir(
        &tmp,
        &tensors,
        &config,
        &generation,
        &tok_config,
        &tokenizer,
    );
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        std::fs::remove_dir(out).map_err(io(out))?;
    }
    std::fs::rename(&tmp, out).map_err(io(out))?;
    let summary = ImportSummary {
        file: file.to_path_buf(),
        out: out.to_path_buf(),
        architecture: arch,
        name: meta.string("general.name")?.map(str::to_string),
        layers: h.layers,
        hidden_size: h.hidden,
        vocab_size,
        tied_embeddings: tied,
        parameters,
        tensor_types,
        seconds: start.elapsed().as_secs_f64(),
    };
    tracing::info!(
        parameters,
        seconds = summary.seconds,
        "imported {}",
        out.display()
    );
    Ok(summary)
}

fn write_dir(
    dir: &Path,
    tensors: &[(String, Tensor)],
    config: &serde_json::Value,
    generation: &serde_json::Value,
    tok_config: &serde_json::Value,
    tokenizer: &tokenizers::Tokenizer,
) -> Result<(), ImportError> {
    let io = |path: PathBuf| move |source| ImportError::Io { path, source };
    let weights = dir.join("model.safetensors");
    // `format: pt` is what transformers expects of a safetensors checkpoint's metadata.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        &weights,
    )
    .map_err(|e| ImportError::Output {
        path: weights.clone(),
        reason: format!("cannot write: {e}"),
    })?;
    for (name, value) in [
        ("config.json", config),
        ("generation_config.json", generation),
        ("tokenizer_config.json", tok_config),
    ] {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
        std::fs::write(&path, text).map_err(io(path.clone()))?;
    }
    let tok_path = dir.join("tokenizer.json");
    tokenizer
        .save(&tok_path, false)
        .map_err(|e| ImportError::Output {
            path: tok_path.clone(),
            reason: format!("cannot write: {e}"),
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, QTensor};
    use candle_core::DType;

    #[test]
    fn rope_permutation_round_trips_and_matches_llama_cpp() {
        // Two heads of width 4, one input column: HF rows [h0: a0 a1 b0 b1 | h1: ...] where a
        // is the first half and b the second; llama.cpp interleaves them as a0 b0 a1 b1.
        let w = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let p = permute_rope_rows(&w, 2).unwrap();
        let v: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [0., 2., 1., 3., 4., 6., 5., 7.]);
        let back = unpermute_rope_rows(&p, 2).unwrap();
        let v: Vec<f32> = back.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [0., 1., 2., 3., 4., 5., 6., 7.]);
        assert!(unpermute_rope_rows(&w, 3).is_err());
    }

    fn meta_value(s: &str) -> Value {
        Value::String(s.into())
    }

    /// A one-layer Llama with width 8, 2 heads (1 key/value head), inner width 16, and a tiny
    /// byte-level vocabulary, written as GGUF with F32 (and one Q8_0) tensors. Returns the
    /// Hugging Face tensors it was made from.
    fn write_tiny(path: &Path, arch: &str, tied: bool) -> BTreeMap<String, Tensor> {
        let dev = Device::Cpu;
        let tokens: Vec<String> = ["<|end|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab"]
            .iter()
            .map(|s| s.to_string())
            .chain((0..26).map(|i| format!("t{i}")))
            .collect();
        let vocab = tokens.len();
        let mut hf = BTreeMap::new();
        let mut seed = 1u64;
        let mut rand = |shape: &[usize]| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            Tensor::randn(0f32, 1.0, shape, &dev)
                .unwrap()
                .affine(1.0, (seed % 7) as f64 * 0.01)
                .unwrap()
        };
        hf.insert("model.embed_tokens.weight".to_string(), rand(&[vocab, 8]));
        hf.insert("model.norm.weight".to_string(), rand(&[8]));
        if !tied {
            hf.insert("lm_head.weight".to_string(), rand(&[vocab, 8]));
        }
        let l = "model.layers.0";
        for (n, s) in [
            ("input_layernorm.weight", vec![8]),
            ("post_attention_layernorm.weight", vec![8]),
            ("self_attn.q_proj.weight", vec![8, 8]),
            ("self_attn.k_proj.weight", vec![4, 8]),
            ("self_attn.v_proj.weight", vec![4, 8]),
            ("self_attn.o_proj.weight", vec![8, 8]),
            ("mlp.gate_proj.weight", vec![16, 8]),
            ("mlp.up_proj.weight", vec![16, 8]),
            ("mlp.down_proj.weight", vec![8, 16]),
        ] {
            hf.insert(format!("{l}.{n}"), rand(&s));
        }
        let gguf_of = |name: &str| -> String {
            match name {
                "model.embed_tokens.weight" => "token_embd.weight".into(),
                "model.norm.weight" => "output_norm.weight".into(),
                "lm_head.weight" => "output.weight".into(),
                other => {
                    let m = other.strip_prefix("model.layers.0.").unwrap();
                    let g = match m {
                        "input_layernorm.weight" => "attn_norm",
                        "post_attention_layernorm.weight" => "ffn_norm",
                        "self_attn.q_proj.weight" => "attn_q",
                        "self_attn.k_proj.weight" => "attn_k",
                        "self_attn.v_proj.weight" => "attn_v",
                        "self_attn.o_proj.weight" => "attn_output",
                        "mlp.gate_proj.weight" => "ffn_gate",
                        "mlp.up_proj.weight" => "ffn_up",
                        "mlp.down_proj.weight" => "ffn_down",
                        _ => unreachable!(),
                    };
                    format!("blk.0.{g}.weight")
                }
            }
        };
        let mut q = Vec::new();
        for (name, t) in &hf {
            let t = if name.ends_with("q_proj.weight") {
                permute_rope_rows(t, 2).unwrap()
            } else if name.ends_with("k_proj.weight") {
                permute_rope_rows(t, 1).unwrap()
            } else {
                t.clone()
            };
            q.push((
                gguf_of(name),
                QTensor::quantize(&t, GgmlDType::F32).unwrap(),
            ));
        }
        let types: Vec<Value> = (0..vocab)
            .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
            .collect();
        let md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), meta_value(arch)),
            ("general.name".into(), meta_value("tiny")),
            (format!("{arch}.block_count"), Value::U32(1)),
            (format!("{arch}.context_length"), Value::U32(64)),
            (format!("{arch}.embedding_length"), Value::U32(8)),
            (format!("{arch}.feed_forward_length"), Value::U32(16)),
            (format!("{arch}.attention.head_count"), Value::U32(2)),
            (format!("{arch}.attention.head_count_kv"), Value::U32(1)),
            (format!("{arch}.rope.freq_base"), Value::F32(100000.0)),
            (
                format!("{arch}.attention.layer_norm_rms_epsilon"),
                Value::F32(1e-5),
            ),
            ("tokenizer.ggml.model".into(), meta_value("gpt2")),
            ("tokenizer.ggml.pre".into(), meta_value("smollm")),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(tokens.iter().map(|s| meta_value(s)).collect()),
            ),
            ("tokenizer.ggml.token_type".into(), Value::Array(types)),
            (
                "tokenizer.ggml.merges".into(),
                Value::Array(vec![meta_value("a b")]),
            ),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
            (
                "tokenizer.chat_template".into(),
                meta_value(
                    "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
                ),
            ),
        ];
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
        hf
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn imports_a_tiny_llama_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        for tied in [true, false] {
            let file = tmp.path().join(format!("tiny-{tied}.gguf"));
            let hf = write_tiny(&file, "llama", tied);
            let out = tmp.path().join(format!("model-{tied}"));
            let s = import_gguf(&file, &out).unwrap();
            assert_eq!(s.tied_embeddings, tied);
            assert_eq!(s.layers, 1);
            assert_eq!(s.vocab_size, 32);
            let got = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)
                .unwrap();
            assert_eq!(got.len(), hf.len());
            for (name, want) in &hf {
                let g = &got[name];
                assert_eq!(g.dtype(), DType::F32);
                assert_eq!(g.dims(), want.dims(), "{name}");
                assert_eq!(max_abs_diff(g, want), 0.0, "{name}");
            }
            // The config leaf and mistral.rs read.
            let cfg = leaf_adapters::LlamaConfig::from_path(&out).unwrap();
            assert_eq!(cfg.tie_word_embeddings, tied);
            assert_eq!(cfg.num_kv_heads(), 1);
            assert_eq!(cfg.rms_norm_eps, 1e-5);
            assert_eq!(cfg.rope_theta, 100000.0);
            assert_eq!(cfg.vocab_size, 32);
            let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
            let enc = tok.encode("<|im_start|>ab<|im_end|>", false).unwrap();
            assert_eq!(enc.get_ids(), [1, 5, 2]);
            let tc: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(tc["eos_token"], "<|im_end|>");
            assert!(tc["chat_template"].as_str().unwrap().contains("<|im_end|>"));
            let gc: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("generation_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(gc["eos_token_id"], 2);
            // The output directory must be new or empty.
            let err = import_gguf(&file, &out).unwrap_err().to_string();
            assert!(err.contains("not an empty directory"), "{err}");
        }
    }

    #[test]
    fn q8_0_and_q4_1_dequantise_within_their_step() {
        let t = Tensor::randn(0f32, 1.0, (4, 64), &Device::Cpu).unwrap();
        for (ty, tol) in [(GgmlDType::Q8_0, 0.02), (GgmlDType::Q4_1, 0.3)] {
            let q = QTensor::quantize(&t, ty).unwrap();
            let d = q.dequantize(&Device::Cpu).unwrap();
            assert!(max_abs_diff(&d, &t) < tol, "{ty:?}");
        }
    }

    #[test]
    fn unsupported_architectures_and_layouts_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("qwen.gguf");
        write_tiny(&file, "qwen2", true);
        let err = import_gguf(&file, &tmp.path().join("out")).unwrap_err();
        assert!(
            matches!(err, ImportError::Architecture { ref architecture, .. } if architecture == "qwen2"),
            "{err}"
        );
        assert!(!tmp.path().join("out").exists());
        let err = import_gguf(&tmp.path().join("absent.gguf"), &tmp.path().join("out"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent.gguf"), "{err}");
        // Not a GGUF file at all.
        let junk = tmp.path().join("junk.gguf");
        std::fs::write(&junk, b"not a gguf file at all").unwrap();
        let err = import_gguf(&junk, &tmp.path().join("out"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a readable GGUF"), "{err}");
    }

    /// A GGUF v3 header by hand: one metadata entry and one tensor of the given GGML type id.
    fn header_with_tensor_type(ty: u32) -> Vec<u8> {
        let mut b = Vec::new();
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend((x.len() as u64).to_le_bytes());
            b.extend(x.as_bytes());
        };
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(1u64.to_le_bytes()); // metadata
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes()); // string
        s(&mut b, "llama");
        s(&mut b, "token_embd.weight");
        b.extend(2u32.to_le_bytes());
        b.extend(256u64.to_le_bytes());
        b.extend(4u64.to_le_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.resize(b.len().div_ceil(32) * 32 + 4096, 0);
        b
    }

    #[test]
    fn unsupported_tensor_types_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        // 16 = IQ2_XXS, which candle does not read.
        let file = tmp.path().join("iq2.gguf");
        std::fs::write(&file, header_with_tensor_type(16)).unwrap();
        let err = import_gguf(&file, &tmp.path().join("out"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("16") && err.contains("Q4_1"), "{err}");
        // 9 = Q8_1: readable, but not a storage type.
        let file = tmp.path().join("q81.gguf");
        std::fs::write(&file, header_with_tensor_type(9)).unwrap();
        let err = import_gguf(&file, &tmp.path().join("out")).unwrap_err();
        assert!(
            matches!(err, ImportError::TensorType { ref dtype, .. } if dtype == "Q8_1"),
            "{err}"
        );
    }
}
