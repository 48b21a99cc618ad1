#!/usr/bin/env python3
"""Regenerates the reward goldens from the reference implementations.

    python3 -m venv /tmp/rewards-venv
    /tmp/rewards-venv/bin/pip install 'sacrebleu>=2,<3' 'jiwer>=4,<5'
    /tmp/rewards-venv/bin/python plugin/tests/data/rewards/make_goldens.py \
        --out plugin/tests/data/rewards/goldens.jsonl

Pairs are generated deterministically from --seed (English and German sentences with
perturbations: dropped, swapped, inserted, replaced and re-cased words, punctuation and
number variants, empty and one-word sides, Unicode noise, mteval escapes). Each line of the
output holds one pair and every expected value:

* bleu / bleu_lc: sacrebleu.sentence_bleu(hyp, [ref]) (lowercase=False / True), with its
  counts, totals, brevity penalty and lengths;
* chrf / chrf_lc: sacrebleu.sentence_chrf(hyp, [ref]) / CHRF(lowercase=True);
* chrfpp / chrfpp_lc: CHRF(word_order=2) (chrF++), cased / lowercased;
* wer / cer (+ _lc): jiwer.process_words / process_characters(ref, hyp) with the default
  transforms (the _lc variants put jiwer.ToLowerCase() first), with S/D/I/H counts;
* exact: the exact-match normalisation documented in leaf_plugin::reward::text, written
  here independently with unicodedata (NFKC, str.lower, drop category P* and
  string.punctuation, whitespace collapse).

The first line is {"meta": {...}} with the seed and library versions.

Held-out check of the CLI on pairs it has never seen:

    python make_goldens.py --seed 7 --n 300 --out /tmp/heldout.jsonl \
        --check-cli $CARGO_TARGET_DIR/debug/leaf
"""

import argparse
import json
import random
import string
import subprocess
import sys
import unicodedata

try:
    import jiwer
    import sacrebleu
    from sacrebleu.metrics import CHRF
except ImportError:  # pragma: no cover - environment problem, not a test failure
    sys.exit("make_goldens.py needs sacrebleu 2.x and jiwer 4.x: pip install 'sacrebleu>=2,<3' 'jiwer>=4,<5'")

DEFAULT_SEED = 20240611
DEFAULT_N = 320

EN = [
    "The cat sat on the mat.",
    "I would like to book a table for two at 7 pm, please.",
    "She paid $3.50 for the coffee and 1,000 yen for the cake.",
    "Don't worry, it's only a test (a very small one).",
    "The meeting starts at 10:30 and ends at 12:15.",
    "Call me at 555-0123 tomorrow morning!",
    "He said: \"We're going to win 3-2.\"",
    "The quick brown fox jumps over the lazy dog.",
    "Turn left after 200 meters, then go straight for 1.5 km.",
    "Is this the right way to the station?",
    "Our revenue grew by 12.5% in Q3 2023.",
    "Please read chapter 4, sections 4.1-4.3, before Monday.",
    "I can't believe it's already December...",
    "The temperature dropped to -5 degrees overnight.",
    "Her e-mail address is anna.smith@example.com.",
    "Well-known authors attended the U.S. premiere.",
    "What time is it?",
    "Thank you very much for your help & patience.",
    "It costs 20 euros, i.e. about 22 dollars.",
    "The results were mixed; some improved, others didn't.",
    "Seven plus three equals ten.",
    "My flight number is LH 400 to New York.",
    "We have 3 cats, 2 dogs and 1 parrot.",
    "Open the window, it's hot in here!",
    "The naïve café owner served crème brûlée.",
]

DE = [
    "Die Katze saß auf der Matte.",
    "Ich möchte bitte einen Tisch für zwei Personen um 19 Uhr reservieren.",
    "Er bezahlte 3,50 € für den Kaffee und 1.000 Yen für den Kuchen.",
    "Keine Sorge, es ist nur ein Test (ein sehr kleiner).",
    "Die Besprechung beginnt um 10:30 Uhr und endet um 12:15 Uhr.",
    "Ruf mich morgen früh unter 0151-234567 an!",
    "Er sagte: „Wir gewinnen 3:2.“",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Biegen Sie nach 200 Metern links ab und fahren Sie 1,5 km geradeaus.",
    "Ist das der richtige Weg zum Bahnhof?",
    "Der Umsatz stieg im dritten Quartal 2023 um 12,5 %.",
    "Bitte lesen Sie Kapitel 4, Abschnitte 4.1–4.3, vor Montag.",
    "Ich kann nicht glauben, dass schon Dezember ist …",
    "Die Temperatur fiel über Nacht auf -5 Grad.",
    "Größere Straßen führen über die Brücke.",
    "Grüß Gott, wie geht es Ihnen heute?",
    "Wie spät ist es?",
    "Vielen Dank für Ihre Hilfe und Geduld!",
    "Das kostet 20 Euro, d. h. etwa 22 Dollar.",
    "Die Ergebnisse waren gemischt; einige verbesserten sich, andere nicht.",
    "Sieben plus drei ist zehn.",
    "Wir haben 3 Katzen, 2 Hunde und 1 Papagei.",
    "Mach bitte das Fenster auf, es ist heiß hier drin!",
    "Übermorgen fahren wir nach Köln – mit dem ICE.",
    "»Ja«, sagte sie, »natürlich!«",
]

VOCAB = (
    "the a an of to in and is was for on with at by from it this that we they he she "
    "der die das und ist war für mit auf von zu im ein eine nicht sehr heute morgen "
    "house Haus car Auto time Zeit zwei two drei three 42 3.14 2,5 1,000 1.000 ok OK"
).split()

UNICODE_NOISE = [
    "é", "e\u0301", "ß", "ẞ", "ÄÖÜ", "İ", "ı", "ﬁ", "Ａ", "ΟΔΟΣ", "οδός", "Σ", "Привет",
    "日本語", "中文", "한국어", "😀", "👍🏽", "\u200b", "\u00a0", "\u3000", "\t", "\x1c",
    "\u2028", "\ufeff", "¿", "¡", "«", "»", "„", "“", "—", "…", "°C", "½", "²", "١٢٣",
    "שלום", "नमस्ते",
]

SPECIAL_PAIRS = [
    ("", ""),
    ("", "The cat sat on the mat."),
    ("The cat sat on the mat.", ""),
    ("   ", "\t"),
    ("word", "word"),
    ("word", "Word"),
    ("Haus", "Häuser"),
    ("a", "b"),
    (".", "."),
    ("!", "?"),
    ("42", "42"),
    ("3.14", "3,14"),
    ("1,000", "1000"),
    ("10-20", "10 - 20"),
    ("&amp; &lt;tag&gt; &quot;q&quot;", "& <tag> \"q\""),
    ("<skipped> hello", "hello"),
    ("line-\nbreak and\nnewline", "linebreak and newline"),
    ("a..b,,c", "a . . b , , c"),
    ("(hi) there.", "hi there"),
    ("ΟΔΟΣ ΟΔΟΣ.", "οδος οδος."),
    ("Straße", "STRASSE"),
    ("İstanbul", "istanbul"),
    ("ﬁne", "fine"),
    ("Cafe\u0301", "Café"),
    ("😀 😀 😀", "😀 😀"),
    ("日本語のテキスト", "日本語テキスト"),
    ("a\u00a0b c", "a b c"),
    ("a\tb  c", "a b c"),
    ("x\x1cy", "x y"),
    ("the the the the the the the", "the cat is on the mat"),
    ("one", "one two three four five six seven eight"),
    ("one two three four five six seven eight", "one"),
]


def perturb(rng, words):
    """Applies 1-3 random edits to a list of words."""
    words = list(words)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["drop", "swap", "insert", "replace", "case", "punct", "number", "unicode",
                         "split", "join"])
        if not words:
            words = [rng.choice(VOCAB)]
            continue
        i = rng.randrange(len(words))
        if op == "drop" and len(words) > 1:
            del words[i]
        elif op == "swap" and len(words) > 1:
            j = min(i + 1, len(words) - 1)
            words[i], words[j] = words[j], words[i]
        elif op == "insert":
            words.insert(i, rng.choice(VOCAB))
        elif op == "replace":
            words[i] = rng.choice(VOCAB)
        elif op == "case":
            words[i] = rng.choice([str.upper, str.lower, str.title, str.swapcase])(words[i])
        elif op == "punct":
            w = words[i].rstrip(".,!?;:")
            words[i] = w + rng.choice(["", ".", ",", "!", "?", "...", " ,", " .", ";", "“", "»"])
        elif op == "number":
            words[i] = rng.choice(["3.5", "3,5", "1,000", "1.000", "10-20", "2023", "-5", "12.5%",
                                   "4.1-4.3", "7pm", "0.5", "½"])
        elif op == "unicode":
            noise = rng.choice(UNICODE_NOISE)
            pos = rng.randint(0, len(words[i]))
            words[i] = words[i][:pos] + noise + words[i][pos:]
        elif op == "split" and len(words[i]) > 3:
            cut = rng.randint(1, len(words[i]) - 1)
            words[i:i + 1] = [words[i][:cut], words[i][cut:]]
        elif op == "join" and i + 1 < len(words):
            words[i:i + 2] = [words[i] + words[i + 1]]
    return words


def join_words(rng, words):
    """Joins words with mostly single spaces and the occasional odd whitespace."""
    out = []
    for k, w in enumerate(words):
        if k:
            out.append(rng.choices([" ", "  ", "\t", " \n ", "\u00a0"], weights=[90, 4, 2, 2, 2])[0])
        out.append(w)
    s = "".join(out)
    if rng.random() < 0.05:
        s = " " + s
    if rng.random() < 0.05:
        s = s + " "
    return s


def random_unicode_text(rng):
    pieces = [rng.choice(UNICODE_NOISE + VOCAB + list(string.punctuation)) for _ in range(rng.randint(1, 10))]
    return join_words(rng, pieces)


def generate_pairs(seed, n):
    rng = random.Random(seed)
    pairs = list(SPECIAL_PAIRS)
    while len(pairs) < n:
        kind = rng.random()
        lang = rng.choice([EN, DE])
        ref = rng.choice(lang)
        if kind < 0.06:
            hyp = ref  # identical
        elif kind < 0.12:
            # one-word sides
            w = rng.choice(ref.split())
            hyp, ref = (w, ref) if rng.random() < 0.5 else (ref, w)
            if rng.random() < 0.5:
                hyp, ref = w, rng.choice([w, w.upper(), rng.choice(VOCAB)])
        elif kind < 0.16:
            # empty side
            hyp, ref = ("", ref) if rng.random() < 0.5 else (ref, "")
        elif kind < 0.24:
            hyp, ref = random_unicode_text(rng), random_unicode_text(rng)
        elif kind < 0.28:
            # a long pair: several sentences (exercises longer alignments)
            many = [rng.choice(lang) for _ in range(rng.randint(3, 8))]
            ref = " ".join(many)
            hyp = join_words(rng, perturb(rng, ref.split()))
        elif kind < 0.32:
            # the other language's sentence: little overlap
            hyp = rng.choice(DE if lang is EN else EN)
        else:
            hyp = join_words(rng, perturb(rng, ref.split()))
            if rng.random() < 0.3:
                ref = join_words(rng, perturb(rng, ref.split()))
        pairs.append((hyp, ref))
    return pairs[:n] if n >= len(SPECIAL_PAIRS) else pairs


def exact_normalize(s):
    s = unicodedata.normalize("NFKC", s).lower()
    s = "".join(c for c in s if not (unicodedata.category(c).startswith("P") or c in string.punctuation))
    return " ".join(s.split())


def jiwer_counts(out, rate):
    return {"rate": float(rate), "hits": out.hits, "substitutions": out.substitutions,
            "deletions": out.deletions, "insertions": out.insertions}


WER_LC = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemoveMultipleSpaces(), jiwer.Strip(),
                        jiwer.ReduceToListOfListOfWords()])
CER_LC = jiwer.Compose([jiwer.ToLowerCase(), jiwer.Strip(), jiwer.ReduceToListOfListOfChars()])


def expected_values(hyp, ref):
    row = {"hyp": hyp, "ref": ref}
    for key, lc in (("bleu", False), ("bleu_lc", True)):
        b = sacrebleu.sentence_bleu(hyp, [ref], lowercase=lc)
        row[key] = {"score": b.score, "counts": list(b.counts), "totals": list(b.totals),
                    "bp": b.bp, "sys_len": b.sys_len, "ref_len": b.ref_len}
    row["chrf"] = sacrebleu.sentence_chrf(hyp, [ref]).score
    row["chrf_lc"] = CHRF(lowercase=True).sentence_score(hyp, [ref]).score
    row["chrfpp"] = CHRF(word_order=2).sentence_score(hyp, [ref]).score
    row["chrfpp_lc"] = CHRF(word_order=2, lowercase=True).sentence_score(hyp, [ref]).score
    w = jiwer.process_words(ref, hyp)
    c = jiwer.process_characters(ref, hyp)
    row["wer"] = jiwer_counts(w, w.wer)
    row["cer"] = jiwer_counts(c, c.cer)
    w = jiwer.process_words(ref, hyp, reference_transform=WER_LC, hypothesis_transform=WER_LC)
    c = jiwer.process_characters(ref, hyp, reference_transform=CER_LC, hypothesis_transform=CER_LC)
    row["wer_lc"] = jiwer_counts(w, w.wer)
    row["cer_lc"] = jiwer_counts(c, c.cer)
    row["exact"] = 1.0 if exact_normalize(hyp) == exact_normalize(ref) else 0.0
    return row


# (CLI metric, --lowercase, how to read the expected raw score from a row)
CLI_CHECKS = [
    ("bleu", False, lambda r: r["bleu"]["score"]),
    ("bleu", True, lambda r: r["bleu_lc"]["score"]),
    ("chrf", False, lambda r: r["chrf"]),
    ("chrf", True, lambda r: r["chrf_lc"]),
    ("chrf++", False, lambda r: r["chrfpp"]),
    ("chrf++", True, lambda r: r["chrfpp_lc"]),
    ("wer", False, lambda r: r["wer"]["rate"]),
    ("wer", True, lambda r: r["wer_lc"]["rate"]),
    ("cer", False, lambda r: r["cer"]["rate"]),
    ("cer", True, lambda r: r["cer_lc"]["rate"]),
    ("exact", False, lambda r: r["exact"]),
]


def check_cli(binary, rows, tol):
    """Runs `leaf reward` for every metric on rows and compares with the expected values."""
    stdin = "".join(json.dumps({"hyp": r["hyp"], "ref": r["ref"]}, ensure_ascii=False) + "\n" for r in rows)
    failures = 0
    for metric, lc, expected in CLI_CHECKS:
        cmd = [binary, "reward", "--metric", metric] + (["--lowercase"] if lc else [])
        proc = subprocess.run(cmd, input=stdin.encode(), capture_output=True, check=False)
        lines = proc.stdout.decode().splitlines()
        if proc.returncode != 0 or len(lines) != len(rows):
            print(f"{' '.join(cmd)}: exit {proc.returncode}, {len(lines)} lines for {len(rows)} pairs\n"
                  f"{proc.stderr.decode()}")
            failures += 1
            continue
        worst = 0.0
        bad = 0
        for r, line in zip(rows, lines):
            got = json.loads(line)["score"]
            diff = abs(got - expected(r))
            worst = max(worst, diff)
            if diff > tol:
                bad += 1
                if bad <= 5:
                    print(f"  {metric}{' -lc' if lc else ''}: hyp={r['hyp']!r} ref={r['ref']!r} "
                          f"expected {expected(r)!r} got {got!r}")
        failures += bad
        print(f"{metric:6}{' --lowercase' if lc else '            '}  {len(rows)} pairs, "
              f"{bad} beyond {tol:g}, max |diff| = {worst:.3g}")
    return failures


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--n", type=int, default=DEFAULT_N, help="number of pairs (>= %d)" % len(SPECIAL_PAIRS))
    ap.add_argument("--out", required=True, help="output JSON Lines file")
    ap.add_argument("--check-cli", metavar="LEAF_BINARY", help="also compare `leaf reward` with the values")
    ap.add_argument("--tol", type=float, default=1e-6)
    args = ap.parse_args()

    if not sacrebleu.__version__.startswith("2."):
        sys.exit(f"need sacrebleu 2.x, found {sacrebleu.__version__}")

    rows = [expected_values(h, r) for h, r in generate_pairs(args.seed, args.n)]
    meta = {"seed": args.seed, "n": len(rows), "sacrebleu": sacrebleu.__version__,
            "jiwer": getattr(jiwer, "__version__", None) or _dist_version("jiwer"),
            "python": sys.version.split()[0], "unicode": unicodedata.unidata_version}
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} pairs to {args.out} ({meta})")

    if args.check_cli:
        failures = check_cli(args.check_cli, rows, args.tol)
        print("CLI agrees" if failures == 0 else f"CLI disagrees on {failures} values")
        sys.exit(1 if failures else 0)


def _dist_version(name):
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    main()
