"""The model store: ``models/<name>/`` folders holding weights, ``manifest.json`` and open_clip's config.

``manifest.json`` records the open_clip architecture, the weights file and its sha256, where the weights
came from and their licence, and the exact preprocessing. ``open_clip_config.json`` beside it makes
the folder loadable by open_clip itself (``local-dir:``).

Run time never touches the network: the hub libraries are switched offline before anything loads,
and weights are read only from the store. ``pull`` is the one command that downloads, on a connected
machine; copy the resulting folder to an air-gapped host.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Licences of the published weight families (open_clip's pretrained table does not carry them).
_LICENCES = {
    "openai": "MIT (OpenAI CLIP)",
    "laion": "MIT (LAION / open_clip)",
    "datacomp": "MIT (DataComp / open_clip)",
    "dfn": "Apple Sample Code License (DFN)",
    "dfndr2b": "Apple Model License (MobileCLIP2)",
    "datacompdr": "Apple Sample Code License (MobileCLIP)",
    "webli": "Apache-2.0 (SigLIP)",
    "metaclip": "CC-BY-NC-4.0 (MetaCLIP)",
}


class ModelError(RuntimeError):
    """A missing, corrupt or unusable model; the message says how to fix it."""


def set_offline(offline: bool = True) -> None:
    """Switch the hub libraries on or off the network, also after they were imported."""
    value = "1" if offline else "0"
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = value
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = offline
    except ImportError:  # pragma: no cover - huggingface_hub is optional at run time
        pass


@contextmanager
def online():
    """The only place localtag may reach the network: a ``models pull``."""
    set_offline(False)
    try:
        yield
    finally:
        set_offline(True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ModelInfo:
    name: str
    path: Path
    arch: str
    weights: str
    sha256: str
    size: int
    preprocess: dict[str, Any]
    model_cfg: dict[str, Any]
    pretrained: str = ""
    source: str = ""
    license: str = ""
    vocab: str | None = None
    templates: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weights_path(self) -> Path:
        return self.path / self.weights

    @property
    def vocab_path(self) -> Path | None:
        return self.path / self.vocab if self.vocab else None

    def manifest(self) -> dict[str, Any]:
        m = {
            "name": self.name,
            "arch": self.arch,
            "weights": self.weights,
            "sha256": self.sha256,
            "size": self.size,
            "pretrained": self.pretrained,
            "source": self.source,
            "license": self.license,
            "preprocess": self.preprocess,
            "model_cfg": self.model_cfg,
        }
        if self.vocab:
            m["vocab"] = self.vocab
        if self.templates:
            m["templates"] = self.templates
        m.update(self.extra)
        return m

    @classmethod
    def read(cls, folder: Path) -> ModelInfo:
        mpath = folder / MANIFEST
        try:
            m = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise ModelError(f"{folder}: no {MANIFEST}; import the weights with `localtag models import`") from None
        except json.JSONDecodeError as e:
            raise ModelError(f"{mpath}: corrupt manifest ({e})") from None
        known = {"name", "arch", "weights", "sha256", "size", "pretrained", "source", "license",
                 "preprocess", "model_cfg", "vocab", "templates"}
        missing = {"arch", "weights", "sha256", "preprocess", "model_cfg"} - m.keys()
        if missing:
            raise ModelError(f"{mpath}: manifest lacks {sorted(missing)}")
        return cls(
            name=m.get("name", folder.name), path=folder, arch=m["arch"], weights=m["weights"],
            sha256=m["sha256"], size=int(m.get("size", -1)), preprocess=m["preprocess"],
            model_cfg=m["model_cfg"], pretrained=m.get("pretrained", ""), source=m.get("source", ""),
            license=m.get("license", ""), vocab=m.get("vocab"), templates=m.get("templates"),
            extra={k: v for k, v in m.items() if k not in known},
        )


def default_preprocess(arch_cfg: dict[str, Any], pretrained_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """open_clip's preprocessing for a config and (optionally) a pretrained tag."""
    size = arch_cfg.get("vision_cfg", {}).get("image_size", 224)
    p = {"size": size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
         "interpolation": "bicubic", "resize_mode": "shortest"}
    for key in ("mean", "std", "interpolation", "resize_mode"):
        if pretrained_cfg and pretrained_cfg.get(key) is not None:
            p[key] = list(pretrained_cfg[key]) if key in ("mean", "std") else pretrained_cfg[key]
    return p


def _looks_openai(path: Path) -> bool:
    """An OpenAI release is a TorchScript archive (a zip holding ``constants.pkl`` / ``code/``)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


class ModelStore:
    """Models under one root folder, each in its own subfolder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def list(self) -> list[ModelInfo]:
        """The usable models; a folder whose manifest can't be read is skipped with a warning."""
        models, broken = self.scan()
        for e in broken:
            log.warning("%s", e)
        return models

    def scan(self) -> tuple[list[ModelInfo], list[ModelError]]:
        """(usable models, the errors of folders whose manifest is corrupt or incomplete)."""
        if not self.root.is_dir():
            return [], []
        out, broken = [], []
        for d in sorted(self.root.iterdir()):
            if (d / MANIFEST).is_file():
                try:
                    out.append(ModelInfo.read(d))
                except ModelError as e:
                    broken.append(e)
        return out, broken

    def resolve(self, name: str) -> ModelInfo:
        """A model by store name, or by a folder path that holds a manifest."""
        candidates = [self.root / name]
        p = Path(name).expanduser()
        if p.is_dir() or os.sep in name or name.startswith("."):
            candidates.insert(0, p)
        for folder in candidates:
            if (folder / MANIFEST).is_file():
                return ModelInfo.read(folder)
        available = ", ".join(m.name for m in self.list()) or "none"
        if p.is_absolute() or os.sep in name or name.startswith((".", "~")):  # a path, not a store name
            what = f"{p} has no {MANIFEST}" if p.is_dir() else f"{p} does not exist"
            raise ModelError(
                f"model folder {what}. Give --model a store name (available in {self.root}: {available}) or a "
                f"folder made by `localtag models import CHECKPOINT --arch ARCH --name NAME` or `models pull`."
            )
        arch, _, tag = name.partition(".")
        hint = (
            f"On a connected machine run `localtag models pull {arch} --pretrained {tag or 'TAG'}` and copy "
            f"models/{name}/ here, or `localtag models import CHECKPOINT --arch ARCH --name {name}`."
        )
        raise ModelError(f"model {name!r} not found in {self.root} (available: {available}). {hint}")

    def verify(self, info: ModelInfo, stamp_dir: Path | None = None) -> None:
        """Raise :class:`ModelError` unless the weights file exists and matches its sha256.

        With ``stamp_dir``, a file whose path, size and mtime were verified before is not hashed again.
        """
        wp = info.weights_path
        if not wp.is_file():
            raise ModelError(f"{info.name}: weights file {wp} is missing; re-import or re-pull the model")
        if info.size >= 0 and wp.stat().st_size != info.size:
            raise ModelError(
                f"{info.name}: {wp.name} is {wp.stat().st_size} bytes, the manifest says {info.size}: "
                "the file is truncated or replaced; re-import or re-pull the model"
            )
        st = wp.stat()
        stamp = None
        if stamp_dir is not None:
            key = hashlib.sha256(f"{wp.resolve()}|{st.st_size}|{st.st_mtime_ns}|{info.sha256}".encode()).hexdigest()
            stamp = Path(stamp_dir) / "verified" / key
            if stamp.exists():
                return
        digest = sha256_file(wp)
        if digest != info.sha256:
            raise ModelError(
                f"{info.name}: sha256 of {wp.name} is {digest[:12]}…, the manifest says {info.sha256[:12]}…: "
                "the file is corrupt; re-import or re-pull the model"
            )
        if stamp is not None:
            try:
                stamp.parent.mkdir(parents=True, exist_ok=True)
                stamp.touch()
            except OSError:
                pass

    def import_checkpoint(
        self,
        path: str | Path,
        arch: str | None = None,
        name: str | None = None,
        *,
        pretrained: str = "",
        source: str = "",
        license: str = "",
        config: str | Path | None = None,
        quick_gelu: bool | None = None,
        preprocess: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> ModelInfo:
        """Copy a checkpoint into the store, hash it, check it loads into ``arch``, write the manifest.

        ``path`` is an OpenAI ``.pt`` (TorchScript), an open_clip ``.bin``/``.pt``/``.pth`` state dict, a
        ``.safetensors`` file, or a folder with ``open_clip_config.json`` and weights. ``config`` is an
        ``open_clip_config.json`` for architectures open_clip does not know.
        """
        import open_clip

        path = Path(path)
        extras: dict[str, Path] = {}
        if path.is_dir():
            config = config or path / OPEN_CLIP_CONFIG
            weights = next((p for s in WEIGHT_SUFFIXES for p in sorted(path.glob(f"*{s}"))), None)
            if weights is None:
                raise ModelError(f"{path}: no weights file ({', '.join(WEIGHT_SUFFIXES)})")
            extras = {p.name: p for p in path.glob("*.txt")}
            name = name or path.name
        else:
            weights = path
        if not weights.is_file():
            raise ModelError(f"{weights}: no such file")
        if weights.suffix not in WEIGHT_SUFFIXES:
            raise ModelError(f"{weights}: unsupported weights format (use {', '.join(WEIGHT_SUFFIXES)})")

        pre_cfg: dict[str, Any] = {}
        if config:
            cfg_json = json.loads(Path(config).read_text())
            model_cfg = cfg_json.get("model_cfg", cfg_json)
            pre_cfg = cfg_json.get("preprocess_cfg", {})
            arch = arch or Path(config).parent.name
        else:
            if not arch:
                raise ModelError("--arch is required (an open_clip architecture, see `open_clip.list_models()`)")
            model_cfg = open_clip.get_model_config(arch)
            if model_cfg is None:
                raise ModelError(f"unknown open_clip architecture {arch!r}; pass --config open_clip_config.json")
        if quick_gelu is None and _looks_openai(weights):
            quick_gelu = True  # OpenAI's releases were trained with QuickGELU
        if quick_gelu:
            model_cfg["quick_gelu"] = True
        prep = default_preprocess(model_cfg)
        prep.update({k: v for k, v in pre_cfg.items() if k in prep})
        prep.update(preprocess or {})

        name = name or (f"{arch}.{pretrained}" if pretrained else weights.stem)
        dest = self.root / name
        if dest.exists() and not overwrite:
            raise ModelError(f"{dest} exists; pass --overwrite or choose another --name")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            shutil.copyfile(weights, tmp / weights.name)
            for fname, src in extras.items():
                shutil.copyfile(src, tmp / fname)
            (tmp / OPEN_CLIP_CONFIG).write_text(
                json.dumps({"model_cfg": model_cfg, "preprocess_cfg": prep}, indent=2) + "\n"
            )
            info = ModelInfo(
                name=name, path=tmp, arch=arch, weights=weights.name, sha256=sha256_file(tmp / weights.name),
                size=(tmp / weights.name).stat().st_size, preprocess=prep, model_cfg=model_cfg,
                pretrained=pretrained, source=source or str(path), license=license,
                vocab="vocab.txt" if "vocab.txt" in extras else None,
                templates=_read_lines(extras.get("templates.txt")),
            )
            build(info)  # fails now, with a clear error, if the weights do not fit the architecture
            (tmp / MANIFEST).write_text(json.dumps(info.manifest(), indent=2) + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
            dest.chmod(0o755)  # mkdtemp made it private
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        info.path = dest
        return info

    def pull(self, arch: str, pretrained: str | None = None, name: str | None = None,
             overwrite: bool = False) -> ModelInfo:
        """Download published weights (open_clip's table, or ``hf-hub:org/repo``) into the store."""
        import open_clip
        from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

        with online():
            if arch.startswith("hf-hub:"):
                repo = arch[len("hf-hub:"):]
                # the repo's open_clip_config.json, fetched by open_clip's public download helper
                tmpcfg = Path(download_pretrained_from_hf(repo, filename=OPEN_CLIP_CONFIG))
                cfg = json.loads(tmpcfg.read_text())
                weights = Path(download_pretrained_from_hf(repo))
                try:
                    return self.import_checkpoint(
                        weights, repo.split("/")[-1], name or repo.replace("/", "--"), pretrained=arch,
                        source=f"https://huggingface.co/{repo}", license=cfg.get("license", "see source"),
                        config=tmpcfg, overwrite=overwrite,
                    )
                finally:
                    shutil.rmtree(tmpcfg.parent, ignore_errors=True)
            if not pretrained:
                raise ModelError(f"--pretrained is required; tags for {arch}: "
                                 f"{open_clip.list_pretrained_tags_by_model(arch)}")
            pcfg = open_clip.get_pretrained_cfg(arch, pretrained)
            if not pcfg:
                raise ModelError(f"{arch} has no pretrained tag {pretrained!r}; "
                                 f"known: {open_clip.list_pretrained_tags_by_model(arch)}")
            weights = Path(download_pretrained(pcfg))
        model_cfg = open_clip.get_model_config(arch)
        if pcfg.get("quick_gelu"):
            model_cfg["quick_gelu"] = True
        family = next((v for k, v in _LICENCES.items() if pretrained.startswith(k)), "see source")
        tmpcfg = Path(tempfile.mkdtemp()) / OPEN_CLIP_CONFIG
        tmpcfg.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": default_preprocess(model_cfg, pcfg)}))
        try:
            return self.import_checkpoint(
                weights, arch, name or f"{arch}.{pretrained}", pretrained=pretrained,
                source=f"https://huggingface.co/{pcfg['hf_hub'].rstrip('/')}" if pcfg.get("hf_hub") else pcfg.get("url", ""),
                license=family, config=tmpcfg, overwrite=overwrite,
            )
        finally:
            shutil.rmtree(tmpcfg.parent, ignore_errors=True)


def _read_lines(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def build(info: ModelInfo):
    """Instantiate the open_clip model of ``info`` on CPU (fp32, eval mode) and load its weights."""
    import open_clip
    import torch

    set_offline(True)
    try:  # open_clip's own factory reads the folder's open_clip_config.json and picks the class
        model = open_clip.create_model(f"local-dir:{info.path}", load_weights=False)
    except Exception as e:
        raise ModelError(f"{info.name}: cannot build architecture {info.arch!r}: {e}") from e
    try:
        with _quiet_torchscript():
            if _looks_openai(info.weights_path):
                # OpenAI's TorchScript release: read its tensors (torch.load(weights_only) refuses archives)
                sd = torch.jit.load(str(info.weights_path), map_location="cpu").state_dict()
                for key in ("input_resolution", "context_length", "vocab_size"):
                    sd.pop(key, None)
                expected = model.state_dict().keys()  # scripted modules also save non-persistent masks
                sd = {k: v for k, v in sd.items() if k in expected or not k.endswith("attn_mask")}
                model.load_state_dict(sd, strict=True)
            else:
                open_clip.load_checkpoint(model, str(info.weights_path), strict=True, weights_only=True)
    except Exception as e:
        raise ModelError(
            f"{info.name}: cannot load {info.weights_path.name} into architecture {info.arch!r} "
            f"(wrong --arch, or a corrupt file): {str(e)[:500]}"
        ) from e
    return model.float().eval()  # callers run it under torch.inference_mode


def logit_params(info: ModelInfo) -> tuple[float, float | None] | None:
    """The model's (logit scale, logit bias) read from its weights file without building the model
    (scale clamped to [1, 100] as CLIP does); None where only a full load can tell (TorchScript)."""
    path = info.weights_path
    if _looks_openai(path):
        return None
    keys = ("logit_scale", "logit_bias")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            found = {k: f.get_tensor(k) for k in keys if k in f.keys()}
    else:
        import torch

        sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else {}
        found = {k: sd[k] for k in keys if k in sd}
        found.update({k: sd["module." + k] for k in keys if "module." + k in sd and k not in found})
    if "logit_scale" not in found:
        return None
    scale = float(found["logit_scale"].float().exp().clamp(1, 100).item())  # as the Tagger computes it
    bias = float(found["logit_bias"].float().item()) if "logit_bias" in found else None
    return scale, bias


@contextmanager
def _quiet_torchscript():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*")
        yield


def tokenizer_for(info: ModelInfo):
    import open_clip

    set_offline(True)
    text_cfg = info.model_cfg.get("text_cfg", {})
    if "hf_tokenizer_name" in text_cfg:
        local = info.path / "tokenizer"
        name = str(local) if local.is_dir() else text_cfg["hf_tokenizer_name"]
        return open_clip.HFTokenizer(name, context_length=text_cfg.get("context_length", 77))
    return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


def preprocess_for(info: ModelInfo):
    """open_clip's exact evaluation transform for the manifest's preprocessing (PIL in, tensor out)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    p = info.preprocess
    cfg = PreprocessCfg(size=p["size"], mean=tuple(p["mean"]), std=tuple(p["std"]),
                        interpolation=p.get("interpolation", "bicubic"),
                        resize_mode=p.get("resize_mode", "shortest"))
    return image_transform_v2(cfg, is_train=False)

