#!/usr/bin/env python3
"""Build the recipe's ~10 MB corpus of real English text from Debian packages.

Sources (all public-domain texts; the Debian packages that carry them are listed in LICENSES.md,
which this script writes next to the corpus):

  * Jane Austen's six novels        Debian r-cran-janeaustenr (R data, decoded here)   ~4.3 MB
  * Herman Melville, Moby-Dick      Debian r-cran-tokenizers  (R data `mobydick`)      ~1.2 MB
  * King James Bible                Debian bible-kjv-text, printed by bible-kjv's `bible` ~4.3 MB
  * Ambrose Bierce, Devil's Dictionary  Debian dict-devil (dictzip = gzip)             ~0.4 MB

The packages are fetched with `apt-get download` (no install, no root needed for the download
itself on most set-ups) at pinned versions, checked against pinned SHA-256 sums, and unpacked with
`dpkg-deb -x` into a cache folder. Nothing else is read, so the same corpus comes out every run;
its SHA-256 is printed and recorded in corpus.json.

Output (in --out, default models/real_model/corpus):
  corpus.txt     training text: documents (book chapters) separated by a line `<|endoftext|>`
  heldout.txt    every 40th document, for validation loss and routing statistics
  corpus.json    sources, sizes, hashes
  LICENSES.md    where each text comes from and under which terms

On a machine with no network (the lent GPU machine) the corpus is carried there: when corpus.txt
and heldout.txt already match corpus.json's hashes this script only checks them.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

SEP = "<|endoftext|>"
HELDOUT_EVERY = 40

# Debian bookworm. version -> sha256 of the .deb (checked after download; a mismatch stops the run).
PACKAGES = {
    "r-cran-janeaustenr": ("1.0.0-1", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),
    "r-cran-tokenizers": ("0.3.0-1", None),   # arch-specific package; its data file is hashed instead
    "bible-kjv-text": ("4.38", "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"),
    "bible-kjv": ("4.38", None),              # arch-specific: the `bible` program that decodes the text
    "dict-devil": ("1.0-13.1", "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154"),
}
# sha256 of the data files actually read (arch-independent), pinned after the first build.
DATA_SHA256 = {
    "janeaustenr/data/Rdata.rdb": "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21",
    "tokenizers/data/Rdata.rdb": "2a7581d1d9c2f49fd8c8493e556f984f4a5cdc071eeb6248b0fa719be6b088fe",
    "bible.data": "6c746c2acc8a34bfded980883ff1701a5d68934a1c853ebf88a07b978fe0ae0e",
    "devil.dict.dz": "995ca92760d677965cb2780e78b808e982f9d49e8c12d795c1854476bbf13819",
}
# what this script wrote from them (Debian bookworm, 2026-11): the same bytes every run
EXPECTED_SHA256 = {
    "corpus.txt": "a6477d780776689987c4d939cff29b42ffb371b0208109e1e73669a9b4ff5141",
    "heldout.txt": "41c136ec31d174a7facb98ae24e5d8c5de929103bd7bfb0e318c972e20e05a8e",
}


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- R data (XDR) reader
class RReader:
    """Just enough of R's serialization format (XDR, versions 2 and 3) for character vectors,
    lists and their attributes, which is what these data packages hold."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.b = data
        self.i = 2
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal R version
        if version == 3:
            n = self.int()
            self.i += n  # native encoding
        self.refs: list = []

    def int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.i)[0]
        self.i += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t == 254:  # NILVALUE
            return None
        if t in (253, 252, 251, 250, 242, 241):  # environments and markers
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            name = self.item()
            self.refs.append(("sym", name))
            return ("sym", name)
        if t in (249, 248):  # NAMESPACESXP, PACKAGESXP: a STRSXP-like name
            self.int()
            n = self.int()
            vals = [self.item() for _ in range(n)]
            self.refs.append(("ns", vals))
            return ("ns", vals)
        if t == 4:  # ENVSXP
            env = {"env": True}
            self.refs.append(env)
            self.int()  # locked
            for _ in range(4):  # enclos, frame, hashtab, attrib
                self.item()
            return env
        if t in (2, 6, 3, 5, 17, 240, 239):  # pairlists and language objects
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            return ("pair", tag, car, cdr, attr)
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.i:self.i + n]
            self.i += n
            return s.decode("utf-8", errors="replace") if not (flags >> 12) & 4 else s.decode("latin-1")
        if t in (10, 13):  # LGLSXP, INTSXP
            n = self.length()
            v = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
            val = v
        elif t == 14:  # REALSXP
            n = self.length()
            v = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
            val = v
        elif t == 16:  # STRSXP
            n = self.length()
            val = [self.item() for _ in range(n)]
        elif t in (19, 20):  # VECSXP, EXPRSXP
            n = self.length()
            val = [self.item() for _ in range(n)]
        elif t == 238:  # ALTREP: class info, state, attributes
            info = self.item()
            state = self.item()
            attr = self.item()
            return ("altrep", info, state, attr)
        else:
            raise ValueError(f"R type {t} not handled")
        if has_attr:
            self.item()
        return val


def read_rdb(pkg_dir: Path) -> dict:
    """Objects of an R package's lazy-load data base (data/Rdata.rdx + Rdata.rdb)."""
    idx = RReader(gzip.decompress((pkg_dir / "data/Rdata.rdx").read_bytes())).item()
    # idx: list(variables=<named list of c(offset, length)>, references, compressed)
    variables = idx[0]
    rdb = (pkg_dir / "data/Rdata.rdb").read_bytes()
    # names of `variables` are in its attributes, which RReader skips: read them from the pairlist
    names = _names_of_first_list(gzip.decompress((pkg_dir / "data/Rdata.rdx").read_bytes()))
    out = {}
    for name, (off, ln) in zip(names, variables):
        off, ln = int(off), int(ln)
        blob = rdb[off:off + ln]
        raw_len = struct.unpack(">I", blob[:4])[0]
        body = blob[4:]
        if body[:1] in (b"Z", b"2", b"X", b"0") and not body[:2] == b"x\x9c":
            kind, body = body[:1], body[1:]
            if kind == b"Z":
                data = zlib.decompress(body)
            elif kind == b"X":
                import lzma
                data = lzma.decompress(body)
            elif kind == b"2":
                import bz2
                data = bz2.decompress(body)
            else:
                data = body
        else:
            data = zlib.decompress(body)
        assert len(data) == raw_len, (name, len(data), raw_len)
        out[name] = RReader(data).item()
    return out


def _names_of_first_list(data: bytes) -> list[str]:
    """The `names` attribute of the first element (`variables`) of an .rdx index."""
    r = RReader(data)
    flags = r.int()
    assert flags & 0xFF == 19
    r.length()
    # first element: named VECSXP with attributes
    flags = r.int()
    assert flags & 0xFF == 19 and flags & (1 << 9)
    n = r.length()
    for _ in range(n):
        r.item()
    attr = r.item()  # pairlist: tag=names, car=STRSXP
    node = attr
    while node is not None:
        _, tag, car, cdr, _ = node
        if tag == ("sym", "names"):
            return list(car)
        node = cdr
    raise ValueError("no names")


# ----------------------------------------------------------------------------- fetching
def fetch(cache: Path) -> Path:
    """Download and unpack the pinned Debian packages into cache/root; return that root."""
    debs = cache / "debs"
    root = cache / "root"
    debs.mkdir(parents=True, exist_ok=True)
    for name, (version, sha) in PACKAGES.items():
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            print(f"[corpus] apt-get download {name}={version}", file=sys.stderr)
            r = subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=debs,
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                print(f"[corpus] {name}={version} not found; trying the current version "
                      "(the corpus hash will tell whether the text changed)", file=sys.stderr)
                r = subprocess.run(["apt-get", "download", name], cwd=debs,
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(f"apt-get download {name} failed (run `apt-get update` first?):\n{r.stderr}")
            found = sorted(debs.glob(f"{name}_*.deb"))
        deb = found[-1]
        if sha and f"_{version}_" in deb.name and sha256_file(deb) != sha:
            sys.exit(f"{deb}: sha256 differs from the pinned one")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


# ----------------------------------------------------------------------------- text clean-up
def reflow(lines: list[str]) -> list[str]:
    """Hard-wrapped lines -> paragraphs (a blank line separates paragraphs)."""
    paras, cur = [], []
    for ln in lines:
        ln = (ln or "").strip()
        if not ln:
            if cur:
                paras.append(" ".join(cur))
                cur = []
        else:
            cur.append(ln)
    if cur:
        paras.append(" ".join(cur))
    return [tidy(p) for p in paras if p]


def tidy(s: str) -> str:
    s = s.replace("\u00a0", " ")
    # Gutenberg's _italics_ markers
    s = re.sub(r"_([^_]+)_", r"\1", s)
    s = re.sub(r"[ \t]+", " ", s)
    return s.strip()


CHAPTER = re.compile(r"^(CHAPTER|Chapter)\s+[0-9IVXLC]+\.?\s*$|^(CHAPTER|Chapter)\s+[0-9IVXLC]+\b")


def split_chapters(title: str, paras: list[str], start: re.Pattern) -> list[tuple[str, str]]:
    docs, cur, head = [], [], None
    for p in paras:
        if start.match(p):
            if cur and head is not None:
                docs.append((f"{title}, {head}", "\n\n".join(cur)))
            head, cur = p.rstrip("."), [p]
        elif head is not None:
            cur.append(p)
    if cur and head is not None:
        docs.append((f"{title}, {head}", "\n\n".join(cur)))
    return docs


AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def austen(root: Path) -> list[tuple[str, str]]:
    books = read_rdb(root / "usr/lib/R/site-library/janeaustenr")
    docs = []
    for key, title in AUSTEN_TITLES.items():
        paras = reflow(books[key])
        docs += split_chapters(title, paras, CHAPTER)
    return docs


def mobydick(root: Path) -> list[tuple[str, str]]:
    objs = read_rdb(root / "usr/lib/R/site-library/tokenizers")
    text = objs["mobydick"]
    text = text[0] if isinstance(text, list) else text
    lines = text.replace("\r\n", "\n").split("\n")
    paras = reflow(lines)
    # the story starts at the first "CHAPTER 1. Loomings." after the table of contents
    pat = re.compile(r"^(CHAPTER \d+\.|Epilogue$|EPILOGUE$)")
    starts = [i for i, p in enumerate(paras) if p.startswith("CHAPTER 1. Loomings")]
    if starts:
        paras = paras[starts[-1]:]
    docs = split_chapters("Moby-Dick", paras, pat)
    # drop the licence text some editions end with
    docs = [(t, d.split("End of Project Gutenberg")[0].split("*** END OF")[0].strip()) for t, d in docs]
    return [(t, d) for t, d in docs if d]


KJV_BOOKS = [
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah",
    "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah",
    "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah",
    "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi", "Matthew", "Mark", "Luke",
    "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy",
    "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John",
    "Jude", "Revelation",
]


def kjv(root: Path) -> list[tuple[str, str]]:
    exe = root / "usr/bin/bible"
    out = subprocess.run([str(exe), "-f", "-p", str(root / "usr/lib"), "Gen1:1-Rev22:21"],
                         capture_output=True, text=True, check=True).stdout
    verse = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    books: list[str] = []  # the program's abbreviations, in canonical order
    for line in out.splitlines():
        m = verse.match(line)
        if not m:
            continue
        b, c, text = m.group(1), int(m.group(2)), m.group(4)
        if b not in books:
            books.append(b)
        key = (b, c)
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(text.strip())
    if len(books) != len(KJV_BOOKS):
        raise ValueError(f"`bible` printed {len(books)} books, expected {len(KJV_BOOKS)}")
    name_of = dict(zip(books, KJV_BOOKS))
    docs = []
    for b, c in order:
        name = name_of[b]
        docs.append((f"{name} {c}", f"{name}, chapter {c}.\n\n" + " ".join(chapters[(b, c)])))
    return docs


def devil(root: Path) -> list[tuple[str, str]]:
    text = gzip.decompress((root / "usr/share/dictd/devil.dict.dz").read_bytes()).decode("utf-8", "replace")
    entries = [e.strip() for e in re.split(r"\n(?=[A-Z][A-Z' -]+, [a-z]+\.)", text)]
    entries = [e for e in entries if re.match(r"[A-Z][A-Z' -]+, [a-z]+\.", e)]
    clean = []
    for e in entries:
        lines = e.split("\n")
        clean.append("\n".join(reflow(lines)))
    # group entries by initial letter: one document per letter
    groups: dict[str, list[str]] = {}
    for e in clean:
        groups.setdefault(e[0], []).append(e)
    return [(f"The Devil's Dictionary, {k}", "\n\n".join(v)) for k, v in sorted(groups.items())]


LICENSES = """# Corpus licences

The corpus is made only of texts in the public domain, taken from Debian (bookworm) packages by
`scripts/real_model/corpus.py`:

| text | author, year | Debian package (version) | package licence | text |
|---|---|---|---|---|
| Sense and Sensibility, Pride and Prejudice, Mansfield Park, Emma, Northanger Abbey, Persuasion | Jane Austen, 1811-1817 | r-cran-janeaustenr (1.0.0-1), CRAN package janeaustenr by Julia Silge | MIT (the R packaging) | public domain (Project Gutenberg transcriptions) |
| Moby-Dick; or, The Whale | Herman Melville, 1851 | r-cran-tokenizers (0.3.0-1), data set `mobydick` of the CRAN package tokenizers by Lincoln Mullen et al. | MIT (the R packaging) | public domain (Project Gutenberg transcription) |
| The Holy Bible, King James Version | 1611 | bible-kjv-text (4.38), decoded by the `bible` program of bible-kjv (4.38), Chip Chapin's Bible Retrieval System | program: GPL-2+ and "unrestricted use"; see the package's copyright file | public domain (copyright expired; in the United Kingdom the Crown's perpetual Letters Patent still govern printing of the KJV) |
| The Devil's Dictionary | Ambrose Bierce, 1911 | dict-devil (1.0-13.1) | public domain ("A Public Domain Text, Copyright Expired") | public domain |

Project Gutenberg's own licence header and footer are not part of the data these packages ship
(what remains of them is stripped), and no Project Gutenberg trademark is used. The texts were
reflowed (hard line breaks joined into paragraphs, `_italic_` markers removed) and split into
chapters; nothing else was changed.

The model trained on this corpus, its tokenizer and its GGUF are derived from public-domain text
only.
"""


def build(out: Path, cache: Path) -> dict:
    root = fetch(cache)
    data_files = {
        "janeaustenr/data/Rdata.rdb": root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",
        "tokenizers/data/Rdata.rdb": root / "usr/lib/R/site-library/tokenizers/data/Rdata.rdb",
        "bible.data": root / "usr/lib/bible.data",
        "devil.dict.dz": root / "usr/share/dictd/devil.dict.dz",
    }
    hashes = {k: sha256_file(p) for k, p in data_files.items()}
    for k, h in hashes.items():
        if DATA_SHA256.get(k) and DATA_SHA256[k] != h:
            print(f"[corpus] WARNING: {k} differs from the pinned data (sha256 {h})", file=sys.stderr)
    sources = [
        ("austen", austen(root)),
        ("mobydick", mobydick(root)),
        ("kjv", kjv(root)),
        ("devil", devil(root)),
    ]
    train_docs, held_docs, info = [], [], {}
    k = 0
    for name, docs in sources:
        nbytes = sum(len(d.encode()) for _, d in docs)
        info[name] = {"documents": len(docs), "bytes": nbytes}
        for title, text in docs:
            (held_docs if k % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train_docs).append(text)
            k += 1
    out.mkdir(parents=True, exist_ok=True)
    join = f"\n{SEP}\n"
    (out / "corpus.txt").write_text(join.join(train_docs) + "\n", encoding="utf-8")
    (out / "heldout.txt").write_text(join.join(held_docs) + "\n", encoding="utf-8")
    (out / "LICENSES.md").write_text(LICENSES, encoding="utf-8")
    meta = {
        "separator": SEP,
        "heldout_every": HELDOUT_EVERY,
        "sources": info,
        "debian_packages": {n: v for n, (v, _) in PACKAGES.items()},
        "data_sha256": hashes,
        "corpus_txt": {"bytes": (out / "corpus.txt").stat().st_size, "sha256": sha256_file(out / "corpus.txt"),
                       "documents": len(train_docs)},
        "heldout_txt": {"bytes": (out / "heldout.txt").stat().st_size, "sha256": sha256_file(out / "heldout.txt"),
                        "documents": len(held_docs)},
    }
    (out / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def verify(out: Path) -> dict | None:
    meta_p = out / "corpus.json"
    if not meta_p.exists():
        return None
    meta = json.loads(meta_p.read_text())
    for f in ("corpus_txt", "heldout_txt"):
        p = out / f.replace("_", ".")
        if not p.exists() or sha256_file(p) != meta[f]["sha256"]:
            return None
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = Path(__file__).resolve().parents[2]
    ap.add_argument("--out", type=Path, default=repo / "models/real_model/corpus")
    ap.add_argument("--cache", type=Path, default=repo / ".cache/real_model/debian")
    ap.add_argument("--force", action="store_true", help="rebuild even when the corpus is already there")
    ap.add_argument("--check-only", action="store_true",
                    help="only verify an existing corpus (for machines with no network)")
    a = ap.parse_args()
    meta = None if a.force else verify(a.out)
    if meta is not None:
        print(f"[corpus] {a.out}/corpus.txt present and intact: {meta['corpus_txt']['bytes']:,} bytes, "
              f"sha256 {meta['corpus_txt']['sha256'][:16]}")
        return
    if a.check_only:
        sys.exit(f"[corpus] no intact corpus in {a.out} (build it on a machine with Debian's archive, then carry it)")
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        sys.exit("[corpus] needs apt-get and dpkg-deb (Debian or Ubuntu)")
    meta = build(a.out, a.cache)
    for name, s in meta["sources"].items():
        print(f"[corpus] {name:9s} {s['documents']:5d} documents {s['bytes']:>11,} bytes")
    print(f"[corpus] corpus.txt  {meta['corpus_txt']['bytes']:,} bytes ({meta['corpus_txt']['documents']} documents) "
          f"sha256 {meta['corpus_txt']['sha256']}")
    print(f"[corpus] heldout.txt {meta['heldout_txt']['bytes']:,} bytes ({meta['heldout_txt']['documents']} documents)")
    same = (meta["corpus_txt"]["sha256"] == EXPECTED_SHA256["corpus.txt"]
            and meta["heldout_txt"]["sha256"] == EXPECTED_SHA256["heldout.txt"])
    print("[corpus] identical to the reference corpus" if same else
          "[corpus] WARNING: differs from the reference corpus (other package versions?)")


if __name__ == "__main__":
    main()
