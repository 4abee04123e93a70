"""Write any map-style source as webdataset shards plus ``sizes.json``.

python -m vlhub.data.write_shards --source synthetic --num-samples 1000 --out DIR --shard-size 100
python -m vlhub.data.write_shards --source csv --root pairs.csv --out DIR --shard-size 10000
python -m vlhub.data.write_shards --source imagefolder --root train/ --out DIR --shard-size 10000

Shards are ``DIR/shard-000000.tar``, ... written with ``webdataset.TarWriter``: per sample
``<key>.jpg`` (or ``.png``), ``<key>.txt`` and ``<key>.cls`` (when the source has labels), so any
webdataset reader reads them. ``sizes.json`` maps each shard's file name to its sample count
(what ``data=wds`` reads for the epoch length). Samples the source cannot read are skipped and
counted on the console. The spec to pass as ``data.root`` is printed at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import webdataset

from vlhub.data.batch import BadSample, RawSample
from vlhub.data.files import CsvPairs, ImageFolderPairs
from vlhub.data.pair_source import PairSource
from vlhub.data.synthetic import SyntheticShapes

log = logging.getLogger("vlhub.data.write_shards")


def encode_image(sample: RawSample, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        sample.image.save(buffer, format="JPEG", quality=quality)
    else:
        sample.image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(
    samples: Iterable[RawSample | BadSample],
    out: str | Path,
    shard_size: int,
    image_format: str = "jpg",
    quality: int = 95,
    with_labels: bool = True,
    overwrite: bool = False,
) -> tuple[list[Path], int]:
    """Write ``samples`` into shards of ``shard_size``; returns (shard paths, samples skipped).
    ``out`` must hold no shards yet (``overwrite``: its ``shard-*.tar`` and ``sizes.json`` are removed)."""
    if shard_size <= 0:
        raise ValueError(f"--shard-size must be > 0, got {shard_size}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"--format must be jpg or png, got {image_format!r}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    old = sorted(folder.glob("shard-*.tar")) + sorted(folder.glob("sizes.json"))
    if old and not overwrite:  # new shards beside old ones, and a sizes.json listing only the new
        raise ValueError(
            f"--out {folder} already holds {len(old)} shard file(s) ({old[0].name}, ...): use an empty folder, "
            "or --overwrite to remove them first"
        )
    for path in old:
        path.unlink()
    paths: list[Path] = []
    sizes: dict[str, int] = {}
    writer, written, skipped = None, 0, 0
    try:
        for sample in samples:
            if isinstance(sample, BadSample):
                skipped += 1
                log.warning("skipped: %s", sample)
                continue
            if written % shard_size == 0:
                if writer is not None:
                    writer.close()
                paths.append(folder / f"shard-{len(paths):06d}.tar")
                writer = webdataset.TarWriter(str(paths[-1]))
                sizes[paths[-1].name] = 0
            record = {"__key__": f"{written:09d}", image_format: encode_image(sample, image_format, quality)}
            record["txt"] = sample.caption
            if with_labels and sample.label >= 0:
                record["cls"] = str(sample.label)
            writer.write(record)  # type: ignore[union-attr]
            sizes[paths[-1].name] += 1
            written += 1
    finally:
        if writer is not None:
            writer.close()
    if written == 0:
        raise ValueError(f"none of the {skipped} samples could be read (see the warnings above): no shards written")
    (folder / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    return paths, skipped


def read_all(source: PairSource) -> Iterable[RawSample | BadSample]:
    for index in range(len(source)):
        try:
            yield source.load(index)
        except BadSample as bad:
            yield bad


# The sources name their own parameters (``root=``); this command's user gave its flags.
FLAGS = {
    "root": "--root",
    "num_samples": "--num-samples",
    "image_size": "--image-size",
    "image_key": "--image-key",
    "caption_key": "--caption-key",
    "label_key": "--label-key",
    "separator": "--separator",
    "caption_template": "--caption-template",
}
_PARAMETER = re.compile(rf"(?<![\w.\-])({'|'.join(FLAGS)})(?==)|^({'|'.join(FLAGS)})\b")


def as_flags(message: str) -> str:
    """A source's message with the parameters it names (``root=``) replaced by this command's flags."""
    return _PARAMETER.sub(lambda found: FLAGS[found.group(1) or found.group(2)], message)


def build_source(args: argparse.Namespace) -> PairSource:
    if args.source == "synthetic":
        return SyntheticShapes(num_samples=args.num_samples, seed=args.seed, image_size=args.image_size)
    if args.root is None:
        raise ValueError(f"--source {args.source} needs --root")
    if args.source == "csv":
        return CsvPairs(args.root, args.image_key, args.caption_key, args.label_key, args.separator)
    return ImageFolderPairs(args.root, args.caption_template)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlhub.data.write_shards", description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=("csv", "imagefolder", "synthetic"), required=True)
    parser.add_argument("--root", help="the CSV file (csv) or the class-folder root (imagefolder)")
    parser.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar and sizes.json")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--format", default="jpg", choices=("jpg", "png"), help="image encoding in the shards")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--num-samples", type=int, default=1000, help="synthetic: how many samples")
    parser.add_argument("--image-size", type=int, default=32, help="synthetic: image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    parser.add_argument("--image-key", default="filepath", help="csv: image path column")
    parser.add_argument("--caption-key", default="title", help="csv: caption column")
    parser.add_argument("--label-key", default=None, help="csv: integer label column (written as .cls)")
    parser.add_argument("--separator", default=",", help="csv: separator")
    parser.add_argument("--caption-template", default="a photo of a {}.", help="imagefolder: caption template")
    parser.add_argument("--overwrite", action="store_true", help="remove the shards already in --out first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:  # a mistake is one line naming the flag, exit code 1
        source = build_source(args)
        samples = read_all(source)
        paths, skipped = write_shards(
            samples, args.out, args.shard_size, args.format, args.quality, True, args.overwrite
        )
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {as_flags(str(error))}") from None
    total = len(source) - skipped
    spec = f"{Path(args.out).resolve()}/shard-{{000000..{len(paths) - 1:06d}}}.tar"
    print(f"wrote {total} samples in {len(paths)} shards to {args.out} ({skipped} unreadable samples skipped)")
    print(f"train on them with: python -m vlhub.train data=wds 'data.root=\"{spec}\"'")


if __name__ == "__main__":
    main()
