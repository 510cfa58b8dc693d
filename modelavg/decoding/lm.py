"""Language models for the decoding graph's G: ARPA files, pocketsphinx's en-us LM, text.

* ``en-us``: the bigram part of the 3-gram ``en-us.lm.bin`` shipped in the pocketsphinx pip
  package. pocketsphinx can write it as ARPA, but crashes inside the 3-grams (so does Debian's
  ``sphinx_lm_convert``); what it wrote before the crash holds every unigram and all but a few
  dozen bigrams. The dump runs in a child process, and only complete lines of the first two
  orders are kept.
* an ARPA file, of any order.
* a text file (one sentence a line): an interpolated Kneser-Ney n-gram LM (Chen & Goodman,
  "An Empirical Study of Smoothing Techniques for Language Modeling", 1998, sections 2.7 and
  3), one discount per order ``D = n1 / (n1 + 2 n2)``, lower orders from continuation counts,
  the unigram interpolated with the uniform distribution; written in ARPA back-off form, which
  is exact for an interpolated model.

``filter_arpa`` keeps a vocabulary (``--vocab N``: the N most probable words that have a
pronunciation) and an order, recounting the header.

Example::

    dump_enus_arpa("exp/enus-partial.arpa")
    filter_arpa("exp/enus-partial.arpa", "exp/bigram.arpa", max_order=2, keep=None)
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from modelavg.errors import UsageError
from modelavg.io import atomic_write

BOS, EOS = "<s>", "</s>"
LOG10_ZERO = -99.0


def enus_lm_path() -> Path:
    from modelavg.decoding.mdef import default_model_dir

    return default_model_dir().parent / "en-us.lm.bin"


def _write_arpa_child(src: str, dst: str) -> None:
    """Runs in a child process: pocketsphinx may crash part-way (see the module docstring)."""
    from pocketsphinx import Config, LogMath, NGramModel

    log_math = LogMath()  # must outlive the model: a temporary one gives garbage probabilities
    model = NGramModel(Config(), log_math, src)
    model.write(dst, NGramModel.str_to_type("arpa"))


def dump_enus_arpa(dst: str | os.PathLike) -> None:
    """Write what pocketsphinx can of the en-us LM as (partial) ARPA text to ``dst``."""
    src = enus_lm_path()
    if not src.exists():
        raise UsageError(f"{src}: no such file; run: pip install pocketsphinx")
    code = "import sys; from modelavg.decoding.lm import _write_arpa_child as w; w(*sys.argv[1:])"
    subprocess.run(
        [sys.executable, "-c", code, str(src), str(dst)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


def _sections(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(order, fields) of each complete n-gram line of an ARPA file (a torn tail is dropped)."""
    order = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.endswith("\n"):
                return  # the last line of a file whose writer crashed
            text = line.strip()
            if text.startswith("\\") and text.endswith("-grams:"):
                order = int(text[1:].split("-", 1)[0])
            elif text == "\\end\\":
                return
            elif order and text:
                fields = text.split()
                if len(fields) in (order + 1, order + 2):
                    try:
                        float(fields[0])
                    except ValueError:
                        continue
                    yield order, fields


def unigram_log10(path: str | os.PathLike) -> dict[str, float]:
    """Each word of the ARPA file's 1-grams with its log10 probability."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such ARPA file")
    out = {}
    for order, fields in _sections(path):
        if order > 1:
            break
        out[fields[1]] = float(fields[0])
    if not out:
        raise UsageError(f"{path}: no 1-grams (not an ARPA language model)")
    return out


def most_probable(unigrams: dict[str, float], vocab: int) -> set[str]:
    """The ``vocab`` most probable words (ties by name), plus the sentence markers."""
    words = sorted((w for w in unigrams if w not in (BOS, EOS)), key=lambda w: (-unigrams[w], w))
    return {*words[:vocab], BOS, EOS}


def filter_arpa(
    src: str | os.PathLike, dst: str | os.PathLike, max_order: int, keep: set[str] | None
) -> dict[int, int]:
    """Write the n-grams of ``src`` up to ``max_order`` whose words are all in ``keep`` (None:
    all) as a valid ARPA file (back-off weights of the top order dropped). Returns the counts."""
    kept: dict[int, list[str]] = defaultdict(list)
    for order, fields in _sections(Path(src)):
        if order > max_order:
            break
        words = fields[1 : order + 1]
        if keep is not None and not all(w in keep for w in words):
            continue
        bow = fields[order + 1 :] if order < max_order else []
        kept[order].append("\t".join([fields[0], " ".join(words), *bow]) + "\n")
    counts = {k: len(v) for k, v in sorted(kept.items())}

    def write(fh) -> None:
        fh.write(_header(counts).encode())
        for order, lines in sorted(kept.items()):
            fh.write(f"\\{order}-grams:\n".encode())
            fh.write("".join(lines).encode())
            fh.write(b"\n")
        fh.write(b"\\end\\\n")

    atomic_write(dst, write)
    return counts


def _header(counts: dict[int, int]) -> str:
    return "\\data\\\n" + "".join(f"ngram {k}={n}\n" for k, n in counts.items()) + "\n"


def read_sentences(path: str | os.PathLike) -> list[list[str]]:
    """Lower-cased word lists, one per non-empty line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    sentences = [line.lower().split() for line in lines if line.strip()]
    if not sentences:
        raise UsageError(f"{path}: no sentences")
    return sentences


def kneser_ney_arpa(sentences: Iterable[list[str]], order: int = 3) -> str:
    """An interpolated Kneser-Ney LM of the sentences, as ARPA text (see the module docstring)."""
    if order < 1:
        raise UsageError(f"--order {order}: must be at least 1")
    raw: list[Counter] = [Counter() for _ in range(order + 1)]  # raw[k]: k-gram counts
    for words in sentences:
        seq = [BOS, *words, EOS]
        for k in range(1, order + 1):
            for i in range(len(seq) - k + 1):
                raw[k][tuple(seq[i : i + k])] += 1
    del raw[1][(BOS,)]
    # Counts each order's estimate uses: raw at the top and for n-grams that start with <s>
    # (they have no left extension), continuation counts N1+(. g) below.
    used = [Counter() for _ in range(order + 1)]
    used[order] = raw[order]
    for k in range(1, order):
        for gram in raw[k + 1]:
            used[k][gram[1:]] += 1
        for gram, c in raw[k].items():
            if gram[0] == BOS:
                used[k][gram] = c
    vocab = {g[0] for g in raw[1]}
    probs: list[dict[tuple[str, ...], float]] = [{} for _ in range(order + 1)]
    gammas: list[dict[tuple[str, ...], float]] = [{} for _ in range(order + 1)]
    for k in range(1, order + 1):
        d = _discount(used[k])
        totals: Counter = Counter()
        types: Counter = Counter()
        for gram, c in used[k].items():
            totals[gram[:-1]] += c
            types[gram[:-1]] += 1
        gammas[k] = {h: d * types[h] / totals[h] for h in totals}
        for gram, c in used[k].items():
            h = gram[:-1]
            # every suffix of a counted n-gram has a left extension, so it is counted below
            lower = probs[k - 1][gram[1:]] if k > 1 else 1.0 / len(vocab)
            probs[k][gram] = max(c - d, 0.0) / totals[h] + gammas[k][h] * lower
    lines = [_header({k: len(probs[k]) + (k == 1) for k in range(1, order + 1)})]
    for k in range(1, order + 1):
        lines.append(f"\\{k}-grams:\n")
        if k == 1:
            lines.append(f"{LOG10_ZERO:.4f}\t{BOS}\t{_log10(gammas[2].get((BOS,), 1.0)):.6f}\n"
                         if order > 1 else f"{LOG10_ZERO:.4f}\t{BOS}\n")  # fmt: skip
        for gram in sorted(probs[k]):
            line = f"{math.log10(probs[k][gram]):.6f}\t{' '.join(gram)}"
            if k < order and gram in gammas[k + 1]:
                line += f"\t{_log10(gammas[k + 1][gram]):.6f}"
            lines.append(line + "\n")
        lines.append("\n")
    lines.append("\\end\\\n")
    return "".join(lines)


def _discount(counts: Counter) -> float:
    """Ney's absolute discount n1 / (n1 + 2 n2), kept inside (0, 1)."""
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    if n1 == 0 or n2 == 0:
        return 0.5
    return min(max(n1 / (n1 + 2 * n2), 0.05), 0.95)


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else LOG10_ZERO


def write_text_lm(text: str | os.PathLike, dst: str | os.PathLike, order: int) -> None:
    """Estimate the Kneser-Ney LM of a text file into an ARPA file (atomically)."""
    arpa = kneser_ney_arpa(read_sentences(text), order)
    atomic_write(dst, lambda fh: fh.write(arpa.encode()))


def prepare_arpa(
    lm: str, lm_text: str | None, order: int, keep: set[str], vocab: int | None, work: Path
) -> Path:
    """The ARPA file G is built from, restricted to words with a pronunciation (``keep``) and,
    with ``vocab``, to the most probable of them. ``work`` holds the intermediate files."""
    if lm_text is not None:
        src = work / "text.arpa"
        write_text_lm(lm_text, src, order)
        max_order = order
    elif lm == "en-us":
        src = work / "en-us-dump.arpa"
        dump_enus_arpa(src)
        max_order = 2
    else:
        src, max_order = Path(lm), 99
    unigrams = unigram_log10(src)
    words = {w for w in unigrams if w in keep or w in (BOS, EOS)}
    if not words - {BOS, EOS}:
        raise UsageError(f"{lm_text or lm}: no word of the language model has a pronunciation")
    if vocab is not None:
        words = most_probable({w: unigrams[w] for w in words}, vocab)
    dst = work / "G.arpa"
    counts = filter_arpa(src, dst, max_order, words)
    if counts.get(1, 0) == 0:
        raise UsageError(f"{lm_text or lm}: no usable n-grams")
    return dst
