#!/usr/bin/env python3
"""PyTorch CPU baseline of `leaf bench-train`: the same LoRA training step on the same shape.

A randomly initialised Llama-style decoder (RMSNorm, RoPE `rotate_half`, causal attention,
SwiGLU MLP, untied LM head) with LoRA on q, k, v, o, gate, up and down (alpha = 2 * rank,
dropout on the LoRA input), and the step `leaf` runs (`plugin/src/trainer/update.rs`, one
epoch):

* a training forward pass of the policy (LoRA on, dropout) over `prompt ++ completion[:-1]`,
  the LM head applied to the completion positions only, log-softmax and the target log-probs;
* a reference forward pass with LoRA off, without gradients;
* the PPO-clip + k3 KL loss per sequence, its mean over the batch, backward, the global
  gradient norm clipped to 1, and one AdamW step (weight decay 0, betas 0.9 / 0.95).

Tokens per second counts `batch * seq` tokens per step, as `leaf bench-train` does. The result
is one JSON line on stdout. Run with the CPU build of PyTorch (any wheel works: only the CPU is
used); `leaf bench-train --compare-torch` runs this script in the same process tree.
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn


class Lora(nn.Module):
    """`x W^T + scale * dropout(x) A^T B^T` with a frozen `W`."""

    def __init__(self, in_f, out_f, rank, dropout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_f, in_f) * 0.02, requires_grad=False)
        bound = 1.0 / math.sqrt(in_f)
        self.a = nn.Parameter(torch.empty(rank, in_f).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(out_f, rank))
        self.scale = 2.0  # alpha / rank with alpha = 2 * rank
        self.dropout = dropout
        self.lora_on = True

    def forward(self, x):
        y = F.linear(x, self.weight)
        if not self.lora_on:
            return y
        h = F.dropout(x, self.dropout, self.training)
        return y + F.linear(F.linear(h, self.a), self.b) * self.scale


class RmsNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Layer(nn.Module):
    def __init__(self, d, inter, heads, rank, dropout):
        super().__init__()
        self.heads = heads
        self.hd = d // heads
        self.input_norm = RmsNorm(d)
        self.post_norm = RmsNorm(d)
        self.q = Lora(d, d, rank, dropout)
        self.k = Lora(d, d, rank, dropout)
        self.v = Lora(d, d, rank, dropout)
        self.o = Lora(d, d, rank, dropout)
        self.gate = Lora(d, inter, rank, dropout)
        self.up = Lora(d, inter, rank, dropout)
        self.down = Lora(inter, d, rank, dropout)

    def forward(self, x, cos, sin, mask):
        b, t, d = x.shape
        h = self.input_norm(x)

        def split(y):
            return y.view(b, t, self.heads, self.hd).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o(ctx.transpose(1, 2).reshape(b, t, d))
        h = self.post_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Model(nn.Module):
    def __init__(self, a):
        super().__init__()
        d = a.hidden
        self.embed = nn.Parameter(torch.randn(a.vocab, d) * 0.02, requires_grad=False)
        self.layers = nn.ModuleList(
            Layer(d, a.intermediate, a.heads, a.rank, a.dropout) for _ in range(a.layers)
        )
        self.norm = RmsNorm(d)
        self.head = nn.Parameter(torch.randn(a.vocab, d) * 0.02, requires_grad=False)
        hd = d // a.heads
        inv = 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)
        freqs = torch.outer(torch.arange(a.seq).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def set_lora(self, on):
        for m in self.modules():
            if isinstance(m, Lora):
                m.lora_on = on

    def logprobs(self, ids, gather, targets):
        b, t = ids.shape
        x = F.embedding(ids, self.embed)
        mask = torch.full((t, t), float("-inf")).triu(1)
        cos, sin = self.cos[:t], self.sin[:t]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        h = x.reshape(b * t, -1)[gather]
        logits = F.linear(self.norm(h), self.head)
        logp = F.log_softmax(logits, dim=-1)
        return logp.gather(1, targets.reshape(-1, 1)).reshape(targets.shape)


def default_intermediate(d):
    return (8 * d // 3 + 63) // 64 * 64


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if min(a.layers, a.hidden, a.vocab, a.batch, a.rank, a.steps, a.threads) <= 0:
        p.error("shape arguments, --steps and --threads must be positive")
    if a.seq < 2 or not 1 <= a.prompt_len < a.seq:
        p.error("need 1 <= --prompt-len < --seq")
    a.intermediate = a.intermediate or default_intermediate(a.hidden)
    a.heads = a.heads or max(a.hidden // 64, 1)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    model = Model(a)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    completion = a.seq - a.prompt_len
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq))
    ids = tokens[:, :-1].contiguous()  # prompt ++ completion[:-1]
    t = ids.shape[1]
    targets = tokens[:, a.prompt_len :]
    gather = (
        torch.arange(a.batch).unsqueeze(1) * t
        + a.prompt_len
        - 1
        + torch.arange(completion).unsqueeze(0)
    ).reshape(-1)
    adv = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(a.batch)]).unsqueeze(1)

    def step():
        model.train()
        model.set_lora(True)
        new = model.logprobs(ids, gather, targets)
        with torch.no_grad():
            model.eval()
            model.set_lora(False)
            ref = model.logprobs(ids, gather, targets)
            model.set_lora(True)
        old = new.detach()
        ratio = (new - old).exp()
        pg = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        diff = ref - new
        kl = diff.exp() - diff - 1.0
        loss = (pg + 0.02 * kl).mean(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    for _ in range(a.warmup):
        step()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    secs = (time.perf_counter() - start) / a.steps
    print(
        json.dumps(
            {
                "tokens_per_second": a.batch * a.seq / secs,
                "seconds_per_step": secs,
                "steps": a.steps,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "trainable_parameters": sum(q.numel() for q in params),
            }
        )
    )


if __name__ == "__main__":
    main()
