"""The cleaning every source of the ``process`` stage gets: markup, invisible characters,
whitespace, PII masking; and the normalised form of a question that groups twins for the split.

pyarrow compute cleans the texts (its RE2 regexes know Unicode classes such as format
characters, which Python's ``re`` does not); Python's ``re`` masks PII (lookarounds).
"""

from __future__ import annotations

import html
import re

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# Cleaning, RE2 syntax (pyarrow compute). Format characters (zero-width space, joiners, BOM,
# LRM) and control characters other than whitespace are deleted; every run of whitespace,
# Unicode spaces included (U+3000 ideographic space, U+00A0 from &nbsp;), becomes one ASCII
# space. cMedQA2 texts are single-line forum posts, so line breaks are scraping artefacts.
RE_INVISIBLE = r"[\p{Cf}\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]"
RE_SPACES = r"[\pZ\t\n\v\f\r\x{85}]+"
# Only real tags: "<" must be followed by a letter, "/" or "!--", so "血糖<7" or "体温>38" survive.
RE_TAG = r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>"
# Any character the cleaning could change, and what every PII pattern below needs.
RE_NEEDS_CLEANING = r"[<&\p{Cf}\pZ\x00-\x1f\x7f-\x9f]"
RE_PII_HINT = r"[0-9]{11}|@"

# PII, in this order: an ID card holds 11-digit runs, so IDs go before phones. The lookarounds
# ("not inside a longer digit run") are why masking uses Python's re: RE2 has none.
PII_PATTERNS = {
    "id_card": (re.compile(r"(?<![0-9A-Za-z])[1-9][0-9]{16}[0-9Xx](?![0-9A-Za-z])"), "[ID]"),
    "phone": (re.compile(r"(?<![0-9])1[3-9][0-9]{9}(?![0-9])"), "[PHONE]"),
    "email": (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), "[EMAIL]"),
}


def clean_texts(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Unescape HTML entities, strip tags, delete invisible characters, collapse whitespace, trim."""
    # Entities first (Python's table is complete), so an escaped tag ("&lt;b&gt;") goes too.
    texts = pa.array([html.unescape(t) for t in texts.to_pylist()], pa.string())
    texts = pc.replace_substring_regex(texts, RE_TAG, " ")
    texts = pc.replace_substring_regex(texts, RE_INVISIBLE, "")
    texts = pc.replace_substring_regex(texts, RE_SPACES, " ")
    return pc.utf8_trim(texts, " ")


def mask_pii(texts: list[str]) -> tuple[list[str], dict[str, int]]:
    """Replace ID card numbers, mobile numbers and e-mail addresses by placeholders.

    Returns the masked texts and how many of each kind were replaced (text that already
    said "[PHONE]" is not counted).
    """
    counts = dict.fromkeys(PII_PATTERNS, 0)
    out = []
    for text in texts:
        for kind, (pattern, placeholder) in PII_PATTERNS.items():
            text, n = pattern.subn(placeholder, text)
            counts[kind] += n
        out.append(text)
    return out, counts


def clean_table(table: pa.Table, mask: bool, stats: dict) -> pd.DataFrame:
    """The table as a DataFrame, its ``content`` cleaned and, if ``mask``, PII-masked (counted in stats).

    One regex scan finds the rows that need either: under 1% of real rows, and the scan
    (0.1 s for 226k answers) costs far less than the replacements on every row (0.3-0.7 s).
    """
    df = table.to_pandas()
    needs = pc.match_substring_regex(
        table["content"], RE_NEEDS_CLEANING + ("|" + RE_PII_HINT if mask else "")
    ).to_numpy()
    if needs.any():
        texts = clean_texts(table["content"].filter(needs)).to_pylist()
        if mask:
            texts, counts = mask_pii(texts)
            stats["pii_masked"] = {k: stats["pii_masked"][k] + counts[k] for k in counts}
        df.loc[needs, "content"] = texts
    return df


def question_key(texts: pd.Series) -> pd.Series:
    """The form under which two questions count as the same for the split and for duplicates.

    NFKC folds full-width letters, digits and punctuation onto their half-width forms (and
    U+3000 onto a space), then case and every space are dropped: "Ｈ Ｐ Ｖ 阳性？" and "hpv阳性?"
    are one question. pyarrow compute does it in one pass over the column.
    """
    keys = pc.utf8_normalize(pa.array(texts, pa.string()), "NFKC")
    keys = pc.utf8_lower(pc.replace_substring_regex(keys, r"[\pZ\s]+", ""))
    # Arrow-backed: no Python string per row (groupings factorize it in Arrow too).
    return pd.Series(keys.to_pandas(types_mapper=pd.ArrowDtype).array, index=texts.index)
