"""What a dataset repository holds for one artifact (`brats-build publish`): the file, its SHA-256 sidecar (which
`brats-train` checks a download against, builder.remote), a dataset card the Hugging Face Hub reads (YAML header,
splits, provenance, the SHA-256, how to cite BraTS) and the data-use terms to check before sharing. Pushing stays
with the user's own tools (`huggingface-cli upload`, `aws s3 cp`)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import h5py
import numpy as np

from builder.checks import decoded_attributes
from builder.format import CASE_ID, DATA_ID, FORMAT_VERSION, SPLIT_GROUP, SPLITS, file_sha256
from builder.inspect import verify
from builder.layout import patient_of

CARD, TERMS = "README.md", "DATA_USE.md"
CITATIONS = (
    "U. Baid et al., The RSNA-ASNR-MICCAI BraTS 2021 Benchmark on Brain Tumor Segmentation and Radiogenomic "
    "Classification, arXiv:2107.02314 (2021)",
    "B. H. Menze et al., The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS), IEEE TMI 34(10), 2015",
    "S. Bakas et al., Advancing The Cancer Genome Atlas glioma MRI collections with expert segmentation labels and "
    "radiomic features, Nature Scientific Data 4:170117, 2017",
)


class PublishError(Exception):
    """A file or folder that cannot be published as asked: one line naming it and the fix."""


def publish(artifact: Path, folder: Path, repository: str = "ORG/NAME") -> list[Path]:
    """Write the artifact, ``NAME.sha256``, README.md (the card) and DATA_USE.md into ``folder``: all of them or,
    on any failure, none. Refuses a file that does not verify and a folder that already holds one of them."""
    problems = verify(artifact)
    if problems:
        raise PublishError(f"{artifact}: {problems[0]}; publish only a file that `brats-build verify` passes")
    targets = [folder / artifact.name, folder / f"{artifact.name}.sha256", folder / CARD, folder / TERMS]
    taken = [t for t in targets if t.exists() or t.is_symlink()]
    if taken:
        raise PublishError(f"{taken[0]}: already there; publish into a new folder (nothing was written)")
    sha256 = file_sha256(artifact)
    texts = {targets[1]: f"{sha256}  {artifact.name}\n", targets[2]: card(artifact, sha256, repository),
             targets[3]: terms()}
    folder.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partials = {target: target.with_name(f".{target.name}.{token}.partial") for target in targets}
    try:
        shutil.copyfile(artifact, partials[targets[0]])
        if file_sha256(partials[targets[0]]) != sha256:
            raise PublishError(f"{artifact}: changed while it was copied; publish it again once nothing writes it")
        for target, text in texts.items():
            partials[target].write_text(text, encoding="utf-8")
        for target in targets:  # every byte written first: a full disk fails before any name appears
            os.replace(partials[target], target)
    except OSError as error:
        raise PublishError(f"{folder}: could not be written ({error.strerror or error}); nothing was published"
                           ) from None
    finally:
        for partial in partials.values():
            partial.unlink(missing_ok=True)
    return targets


def split_counts(f: h5py.File, case_ids: np.ndarray) -> dict[str, tuple[int, int]]:
    """Rows and patients of each split."""
    out = {}
    for name in SPLITS:
        rows = f[SPLIT_GROUP][name][()]
        out[name] = (int(rows.size), len({patient_of(str(c)) for c in case_ids[rows]}) if rows.size else 0)
    return out


def _size_category(rows: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if rows < limit:
            return label
    return "100K<n<1M"


def card(artifact: Path, sha256: str, repository: str) -> str:
    """The dataset card: the Hub's YAML header, then what the file holds and how to use and cite it."""
    with h5py.File(artifact, "r") as f:
        a, _ = decoded_attributes(f)
        case_ids = f[CASE_ID].asstr()[()]
        counts = split_counts(f, case_ids)
        rows, cases = len(case_ids), len(np.unique(case_ids))
    size_mb = artifact.stat().st_size / 1e6
    address = f"hf://datasets/{repository}@main/{artifact.name}"
    splits = "\n".join(f"| {name} | {r} | {p} |" for name, (r, p) in counts.items())
    citations = "\n".join(f"- {c}" for c in CITATIONS)
    version, modalities = a.get("format_version", FORMAT_VERSION), ", ".join(a.get("modalities") or [])
    layouts = ", ".join(a.get("source_layouts") or [])
    return f"""---
pretty_name: "{artifact.stem} (brats2d artifact)"
license: other
license_name: brats-data-use-terms
license_link: {TERMS}
task_categories:
- image-segmentation
tags:
- medical-imaging
- mri
- brain-tumor
- brats
- hdf5
- brats2d
size_categories:
- {_size_category(rows)}
---

# {artifact.stem}

A brats2d artifact: one chunked, checksummed HDF5 file (format v{version}) holding {rows} slices of {cases}
cases, each with its four MRI modalities ({modalities}) and its label map (0 background, 1 necrotic core, 2 oedema,
3 enhancing tumour), with train/val/test splits by patient.

- slices: {a.get('slice_rule')}; plane {a.get('plane') or 'axial'}, {a.get('context') or 0} neighbouring slice(s)
  stored on each side
- built by brats2d builder {a.get('builder_version')} on {a.get('created')} from {layouts} cases, split seed
  {a.get('seed')}
- build id: `{a.get(DATA_ID)}`
- size: {size_mb:.1f} MB; SHA-256: `{sha256}` (also in `{artifact.name}.sha256`)

| split | rows | patients |
|---|---|---|
{splits}

## Use

```bash
pip install 'brats2d[all]'
brats-train fit {address} --modality all       # fetched once, checked against {artifact.name}.sha256
brats-train fit {address} --stream --modality all --workers 8   # read in place by range requests
sha256sum -c {artifact.name}.sha256                  # a downloaded copy, by hand
```

## Before you share it

This file is derived from BraTS patient scans. **Whoever publishes it must first check that the terms under which
they obtained the source data allow sharing a derived dataset, and with whom** ({TERMS}). brats2d does not decide
that for you.

## Citation

Results obtained with BraTS data must cite the BraTS papers:

{citations}
"""


def terms() -> str:
    return """# Data-use terms: read before sharing

This artifact holds slices and labels derived from BraTS patient scans. BraTS releases come with their own terms:
BraTS 2023 is distributed through Synapse after registration, under the challenge's data-use agreement; earlier
releases were distributed under their own terms (The Cancer Imaging Archive, CBICA's image processing portal).

Before you upload this file anywhere, check for the release you used:

1. that its terms allow redistributing derived data (slices, labels), and to whom (anyone, or registered users
   only: a gated or private repository);
2. which licence and attribution they require, and set `license` in README.md accordingly;
3. that the papers the release asks you to cite are cited (README.md lists the usual ones).

If the terms do not allow it, share the build command instead: everyone who has the data can build the same file
(`brats-build build`; the build id and split seed in README.md say which).
"""
