#!/usr/bin/env python3
"""A straightforward pure-Python implementation of LEAF-SPEC.md (and GRPO).

It is the baseline of `cargo bench -p leaf-plugin --bench advantages` and the oracle of the
cross-check test `plugin/tests/advantages_reference.rs`. It follows the spec literally: a full
stable sort of the candidates, dictionaries keyed by prefix tuples, no shortcuts.

Usage:
    leaf_reference.py [--estimator leaf|grpo] [--fork-budget B] [--min-prefix N]
                      [--terms both|global|local] [--time REPEAT] < groups.jsonl

Without --time it prints one JSON line per group, `{"group_id", "advantages"}`.
With --time it runs every group REPEAT times and prints `{"seconds_per_group": ...}`.
"""
import argparse
import json
import math
import sys
import time


def mean(xs):
    return sum(xs) / len(xs)


def sample_std(xs, m):
    d = len(xs) - 1 if len(xs) > 1 else 1
    return math.sqrt(sum((x - m) ** 2 for x in xs) / d)


def leaf(tokens, logprobs, rewards, B=2, min_prefix=1, terms="both"):
    K = len(tokens)
    v0 = mean(rewards)
    # Step 1: boundaries.
    cands = []
    for i in range(K):
        for p in range(max(min_prefix, 1), len(tokens[i])):
            cands.append((-logprobs[i][p], i, p))
    cands = sorted(cands, key=lambda c: -c[0])  # stable: ties keep (i, p) order
    nonempty = [len(t) for t in tokens if len(t) > 0]
    boundaries = []
    if B > 0 and cands and nonempty:
        delta = max(2, min(nonempty) // (B + 1))
        for _, _, p in cands:
            if all(abs(p - q) >= delta for q in boundaries):
                boundaries.append(p)
                if len(boundaries) == B:
                    break
        boundaries.sort()

    def combine(g, l):
        return {"both": g + l, "global": g, "local": l}[terms]

    spans = [[] for _ in range(K)]  # (start, end, raw)
    if not boundaries:
        for i in range(K):
            if tokens[i]:
                spans[i].append((0, len(tokens[i]), rewards[i] - v0))
    else:
        # Step 2: nodes.
        paths = [[] for _ in range(K)]
        for p in boundaries:
            groups = {}
            for i in range(K):
                key = tuple(tokens[i][:p]) if len(tokens[i]) > p else tuple(tokens[i])
                groups.setdefault(key, []).append(i)
            for members in groups.values():
                if len(members) >= 2:
                    node = (p, mean([rewards[m] for m in members]), len(members))
                    for m in members:
                        paths[m].append(node)
        # Step 3: spans.
        for i in range(K):
            prev_pos, prev_v = 0, v0
            for p, v, n in paths[i]:
                if p > prev_pos:
                    spans[i].append((prev_pos, p, combine(v - v0, v - prev_v) / math.sqrt(n)))
                    prev_pos, prev_v = p, v
            if prev_pos < len(tokens[i]):
                r = rewards[i]
                spans[i].append((prev_pos, len(tokens[i]), combine(r - v0, r - prev_v)))
    # Step 4: z-score and broadcast.
    raw = [s[2] for sp in spans for s in sp]
    if raw:
        m = mean(raw)
        sd = max(sample_std(raw, m), 1e-6)
    else:
        m, sd = 0.0, 1e-6
    out = []
    for i in range(K):
        adv = [0.0] * len(tokens[i])
        for start, end, a in spans[i]:
            for t in range(start, min(end, len(tokens[i]))):
                adv[t] = (a - m) / sd
        out.append(adv)
    return out


def grpo(tokens, rewards):
    K = len(rewards)
    if K < 2:
        return [[0.0] * len(t) for t in tokens]
    m = mean(rewards)
    scale = max(sample_std(rewards, m), 1.0 / 3.0) + 1e-6
    return [[(rewards[i] - m) / scale] * len(tokens[i]) for i in range(K)]


def run(group, args):
    tokens = [r["tokens"] for r in group["rollouts"]]
    logprobs = [r["logprobs"] for r in group["rollouts"]]
    rewards = [r["reward"] for r in group["rollouts"]]
    if args.estimator == "grpo":
        return grpo(tokens, rewards)
    return leaf(tokens, logprobs, rewards, args.fork_budget, args.min_prefix, args.terms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--estimator", default="leaf", choices=["leaf", "grpo"])
    ap.add_argument("--fork-budget", type=int, default=2)
    ap.add_argument("--min-prefix", type=int, default=1)
    ap.add_argument("--terms", default="both", choices=["both", "global", "local"])
    ap.add_argument("--time", type=int, default=0, metavar="REPEAT")
    args = ap.parse_args()
    groups = [json.loads(line) for line in sys.stdin if line.strip()]
    if args.time:
        start = time.perf_counter()
        for _ in range(args.time):
            for g in groups:
                run(g, args)
        elapsed = time.perf_counter() - start
        print(json.dumps({"seconds_per_group": elapsed / (args.time * len(groups))}))
        return
    for g in groups:
        print(json.dumps({"group_id": g.get("group_id"), "advantages": run(g, args)}))


if __name__ == "__main__":
    main()
