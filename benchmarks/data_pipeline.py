#!/usr/bin/env python
"""Data pipeline benchmark: samples/s and packing efficiency vs a reference-style baseline.

    python benchmarks/data_pipeline.py --quick     # smoke check, ~2 min on 2 cores
    python benchmarks/data_pipeline.py             # docs/benchmarks.md figures, ~6 min on 2 cores
    python benchmarks/data_pipeline.py --workers 4 --data-dir /tmp/bench_data   # keep the data
    python benchmarks/data_pipeline.py --s3 --quick  # our loader: S3 on loopback vs local files

Generates its own synthetic webdataset shards (in --data-dir, reused when present):
- stage-1-like: JPEGs of 256–640 px per side (photo-like noise + shapes, ~40–90 KB), captions of
  ~50–150 Qwen3 tokens (Recap-DataComp), fixed 224×224 policy → 196 image tokens;
- stage-2-like: 64–1400 px, aspect up to 4:1, native smart-resize policy (16–1024 image tokens),
  conversations json with 150–450-token answers.

Both pipelines read the same shards with the same number of worker processes and produce
PackedBatch rows of 16384 tokens (micro_batch_size 1) in the same process, one after the other:
- **ours**: genlip_megatron.data.build_train_loader (DALI CPU decode, torch uint8 resize, batched
  tokenisation, uint8 patches between processes, first-fit + exact subset-sum packing);
- **baseline**, mirroring the reference (YanFangCS/GenLIP tasks/train_genlip_*.py process_sample,
  veomni TextBatchingStrategy / DynBszBuffer, OmniDataCollatorWithPacking + my_collate_fn): a torch
  DataLoader whose workers run, per sample, PIL decode → convert RGB → PIL BILINEAR resize →
  float64 rescale / float32 normalise (transformers image processor) → patchify, the chat
  template through the tokenizer on the full "<|image_pad|>"×N + prompt string, torch position
  ids; the main process packs greedily first-fit from a 200-sample buffer and pads rows.

Steady state, not start-up: each pipeline first consumes rows until it has taken twice what its
workers and packing buffer can hold ahead (so everything prefetched while it started is used
up and its queues have refilled at the rate they really run), then a window of at least 60 rows
or 30 s is timed (--quick: 12 rows or 8 s, a smoke check only; short windows right after
warm-up overstate the speed by ~25 %). samples/s counts samples placed in rows; CPU time per
sample counts the process and all its workers. Stages alternate baseline/ours per round so
background load hits both alike. The last line is machine-readable:
    BENCH data_pipeline speedup=<ours/baseline> packing_efficiency=<0..1> samples_per_s=<ours>
    baseline_samples_per_s=<baseline> stage1_speedup=... stage2_speedup=...
    cpu_ms_per_sample=<ours> baseline_cpu_ms_per_sample=<baseline> window_rows=<min rows>
(speedup, samples/s and efficiency are totals over both stages; per-stage lines come first).

``--s3`` measures our loader only, on the same shards read from local files and from
``s3://`` served by moto's S3 server in a separate process on 127.0.0.1 (alternating, same
windows), and ends in ``BENCH s3_loader s3_vs_local=<s3/local samples/s> ...`` (goal ≥ 0.8).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genlip_megatron.data.batch import IGNORE_INDEX, PackedBatch  # noqa: E402
from genlip_megatron.config.data import DataConfig, ImageConfig, PackingConfig, \
    ReaderConfig, SourceConfig, TextConfig  # noqa: E402
from genlip_megatron.data.image import smart_resize  # noqa: E402
from genlip_megatron.data.loader import build_train_loader  # noqa: E402
from genlip_megatron.data.shard_writer import write_shards  # noqa: E402
from genlip_megatron.data.tokenizer import TextTokenizer, load_tokenizer, \
    train_tiny_bpe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEQ = 16384
WORDS = ("the a of and with in on at to from near under over behind small large red green "
         "blue white black wooden metal glass old new bright dark round square tall short "
         "person man woman child dog cat car tree house table chair window door street sky "
         "water grass mountain building light shadow background foreground left right center "
         "top bottom standing sitting holding wearing looking showing shows image photo scene "
         "view detail texture surface pattern color several two three many some which is are "
         "has have there this that its their while appears visible partially").split()
PROMPT = "Describe the image in detail."


# ----------------------------------------------------------------------------- data
_TEXTURE: list[np.ndarray] = []


def _texture() -> np.ndarray:
    """One 1600² photo-like texture (smooth colour noise + grain), made once."""
    if not _TEXTURE:
        rng = np.random.default_rng(1234)
        low = rng.integers(0, 256, (67, 67, 3), dtype=np.uint8)
        big = np.asarray(Image.fromarray(low).resize((1600, 1600), Image.BICUBIC), np.int16)
        grain = rng.integers(-12, 13, big.shape, dtype=np.int16)
        _TEXTURE.append(np.clip(big + grain, 0, 255).astype(np.uint8))
    return _TEXTURE[0]


def _photo(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A photo-like JPEG (~40–90 KB at 450²): a random crop of the texture + a few shapes."""
    tex = _texture()
    y, x = (int(rng.integers(0, tex.shape[i] - d + 1)) for i, d in ((0, h), (1, w)))
    crop = tex[y:y + h, x:x + w]
    pil = Image.fromarray(np.ascontiguousarray(crop[:, :, rng.permutation(3)]))
    draw = ImageDraw.Draw(pil)
    for _ in range(3):
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(8, max(9, min(w, h) // 4)))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r),
                     fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _caption(rng: np.random.Generator, words: tuple[int, int]) -> str:
    n = int(rng.integers(*words))
    text = " ".join(rng.choice(WORDS, n))
    return text[0].upper() + text[1:] + "."


def make_data(root: Path, n1: int, n2: int, seed: int = 0) -> None:
    """Write stage-1 and stage-2 shards under ``root`` (skipped if they exist)."""
    if (root / "done.json").is_file() and json.loads((root / "done.json").read_text()) == \
            {"n1": n1, "n2": n2}:
        return
    rng = np.random.default_rng(seed)
    t0 = time.time()

    def stage1():
        for i in range(n1):
            w, h = (int(x) for x in rng.integers(256, 641, 2))
            yield {"__key__": f"a{i:08d}", "jpg": _photo(rng, w, h),
                   "json": {"caption": _caption(rng, (40, 116))}}

    def stage2():
        for i in range(n2):
            side = math.exp(rng.uniform(math.log(64), math.log(1400)))
            aspect = math.exp(rng.uniform(-math.log(4), math.log(4)))
            w = min(1600, max(16, int(side * math.sqrt(aspect))))
            h = min(1600, max(16, int(side / math.sqrt(aspect))))
            conv = [{"from": "human", "value": "<image>Describe this image in detail."},
                    {"from": "gpt", "value": _caption(rng, (120, 350))}]
            yield {"__key__": f"b{i:08d}", "jpg": _photo(rng, w, h),
                   "json": {"conversations": conv}}

    write_shards(stage1(), root / "s1", samples_per_shard=100)
    write_shards(stage2(), root / "s2", samples_per_shard=50)
    (root / "done.json").write_text(json.dumps({"n1": n1, "n2": n2}))
    print(f"generated {n1} + {n2} samples in {time.time() - t0:.1f} s under {root}", flush=True)


def get_tokenizer(root: Path) -> TextTokenizer:
    qwen = REPO / ".cache" / "qwen3" / "tokenizer.json"
    if qwen.is_file():
        return load_tokenizer(qwen)
    print("Qwen3 tokenizer not found (python tools/fetch_qwen3_tokenizer.py); using a tiny BPE",
          flush=True)
    return train_tiny_bpe([" ".join(WORDS), PROMPT], 2000, root / "tokenizer.json",
                          full_byte_alphabet=True)


# ----------------------------------------------------------------------------- baseline
class ReferenceDataset(torch.utils.data.IterableDataset):
    """Per-sample processing as the reference's process_sample does it (see module doc)."""

    def __init__(self, shards: list[str], tokenizer: TextTokenizer, stage: int) -> None:
        self.shards, self.tok, self.stage = shards, tokenizer, stage

    def __iter__(self):
        from webdataset.tariterators import tarfile_samples

        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        mine = self.shards[w::nw]
        while True:  # .repeat()
            for sample in tarfile_samples([{"url": u} for u in mine]):
                out = self.process(sample)
                if out is not None:
                    yield out

    def image(self, data: bytes):
        image = Image.open(io.BytesIO(data))
        image = image.convert("RGBA").convert("RGB") if image.mode == "P" else \
            image.convert("RGB")
        if image.size == (1, 1):
            return None
        if self.stage == 1:
            h, w = 224, 224
        else:
            h, w = smart_resize(image.height, image.width)
        # transformers image processor: to numpy → resize (PIL, BILINEAR) → rescale (float64
        # multiply, cast to float32) → normalize (float32) → channels first
        arr = np.asarray(image.resize((w, h), Image.BILINEAR))
        arr = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
        arr = ((arr - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)
        gh, gw = h // 16, w // 16
        patches = arr.reshape(1, 1, 3, gh, 1, 16, gw, 1, 16).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return torch.from_numpy(np.ascontiguousarray(patches).reshape(gh * gw, 768)), (gh, gw)

    def process(self, sample: dict):
        meta = json.loads(sample["json"])
        turns = meta["conversations"] if "conversations" in meta else \
            [{"from": "human", "value": "<image>" + PROMPT}, {"from": "gpt",
                                                              "value": meta["caption"]}]
        img = self.image(sample["jpg"])
        if img is None:
            return None
        pixel_values, (gh, gw) = img
        n = gh * gw
        ids, labels = [], []
        for i, t in enumerate(turns):  # Qwen2VLPretrainTemplate.encode_messages
            text = t["value"].replace("<image>", "")
            content = ("<|image_pad|>" * n + text if i == 0 else text).strip()
            seg = self.tok.encode(content)
            ids += seg
            labels += seg if t["from"] == "gpt" else [IGNORE_INDEX] * len(seg)
        ids += self.tok.end_ids
        labels += self.tok.end_ids
        input_ids, labels = torch.tensor(ids), torch.tensor(labels)
        image_mask = input_ids == self.tok.image_pad_id
        # get_position_ids
        h_index = torch.arange(gh).view(1, -1, 1).expand(1, -1, gw).flatten()
        w_index = torch.arange(gw).view(1, 1, -1).expand(1, gh, -1).flatten()
        vis = torch.stack([torch.zeros_like(h_index), h_index, w_index])
        txt = torch.arange(len(ids) - n).view(1, -1).expand(3, -1) + vis.max() + 1
        flex = torch.zeros_like(input_ids)
        flex[image_mask] = 1
        input_ids[image_mask] = 0
        labels[image_mask] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels, "position_ids": torch.cat([vis, txt], 1),
                "image_mask": image_mask, "flex_indicators": flex, "pixel_values": pixel_values,
                "image_grid_hw": torch.tensor([gh, gw])}


def reference_rows(loader, buffer_size: int = 200):
    """TextBatchingStrategy(token_micro_bsz=16384, buffer_size=200) + packing collators."""
    buf, it = [], iter(loader)
    while True:
        while len(buf) < buffer_size or sum(len(s["input_ids"]) for s in buf) < SEQ:
            buf.append(next(it))
        total, take = 0, []
        for i, s in enumerate(buf):  # DynBszBuffer.get_samples(force=True)
            if total >= SEQ:
                break
            n = len(s["input_ids"])
            if total == 0 or n <= SEQ - total:
                total += n
                take.append(i)
        chosen = set(take)
        row = [buf[i] for i in take]
        buf = [s for i, s in enumerate(buf) if i not in chosen]
        yield reference_collate(row), len(row), min(total, SEQ)


def reference_collate(row: list[dict]) -> PackedBatch:
    """OmniDataCollatorWithPacking (concatenate, sample ids) + my_collate_fn (pad to 16384)."""
    cat = {k: torch.cat([s[k] for s in row], -1)[..., :SEQ] for k in
           ("input_ids", "labels", "image_mask", "flex_indicators")}
    pos = torch.cat([s["position_ids"] for s in row], -1)[:, :SEQ]
    sample_ids = torch.cat([torch.full((len(s["input_ids"]),), j) for j, s in enumerate(row)])
    pad = SEQ - cat["input_ids"].shape[0]
    tokens = torch.nn.functional.pad(cat["input_ids"], (0, pad))
    labels = torch.nn.functional.pad(cat["labels"], (0, pad), value=IGNORE_INDEX)
    labels = torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])
    lens = torch.tensor([len(s["input_ids"]) for s in row], dtype=torch.int32)
    img = torch.tensor([int(s["image_mask"].sum()) for s in row], dtype=torch.int32)
    zero = torch.zeros(1, dtype=torch.int32)
    return PackedBatch(
        tokens=tokens[None], labels=labels[None],
        position_ids=torch.nn.functional.pad(pos, (0, pad))[None],
        image_mask=torch.nn.functional.pad(cat["image_mask"], (0, pad))[None],
        segment_ids=torch.nn.functional.pad(sample_ids[:SEQ], (0, pad), value=-1)[None].int(),
        pixel_values=torch.cat([s["pixel_values"] for s in row]),
        image_grid_hw=torch.stack([s["image_grid_hw"] for s in row]).int(),
        sample_offsets=torch.cat([zero, lens.cumsum(0)[:-1].int()]), image_lens=img,
        text_lens=lens - img, cu_seqlens=torch.cat([zero, lens.cumsum(0).int()]),
        cu_seqlens_image=torch.cat([zero, img.cumsum(0).int()]),
        cu_seqlens_text=torch.cat([zero, (lens - img).cumsum(0).int()]))


def _cpu_seconds() -> float:
    """User + system CPU of this process and all its descendants (workers, forkserver)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me] + me.children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _measure(next_row, ahead: int, window: tuple[int, float]) -> dict:
    """Time a steady window; ``next_row()`` returns (samples, real tokens).

    Warm-up: rows until ``2 × ahead`` samples (what the pipeline can hold prefetched) were
    consumed. Window: until ``window[0]`` rows or ``window[1]`` seconds, whichever first.
    """
    taken = warm = 0
    while taken < 2 * ahead or warm < 3:
        taken += next_row()[0]
        warm += 1
    min_rows, min_s = window
    t0, c0, samples, real, rows = time.perf_counter(), _cpu_seconds(), 0, 0, 0
    while rows < min_rows and (time.perf_counter() - t0 < min_s or rows < 6):
        n, tokens = next_row()
        samples, real, rows = samples + n, real + tokens, rows + 1
    return {"samples": samples, "seconds": time.perf_counter() - t0,
            "cpu": _cpu_seconds() - c0, "real": real, "slots": rows * SEQ, "rows": rows,
            "warm": warm}


def run_baseline(shards: list[str], tok: TextTokenizer, stage: int, workers: int,
                 window: tuple[int, float]) -> dict:
    ds = ReferenceDataset(shards, tok, stage)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                         persistent_workers=workers > 0)
    gen = reference_rows(loader)

    def next_row():
        _, n, tokens = next(gen)
        return n, tokens

    # DataLoader prefetch (2 samples per worker) + the 200-sample packing buffer
    result = _measure(next_row, 2 * workers + 200, window)
    gen.close()  # stops the DataLoader workers
    return result


# ----------------------------------------------------------------------------- ours
def run_ours(root: Path | str, tok: TextTokenizer, stage: int, workers: int,
             window: tuple[int, float]) -> dict:
    """Our loader over ``root``/s{stage}/*.tar (``root`` may be an ``s3://bucket/prefix``)."""
    paths = f"{root}/s{stage}/*.tar"
    if stage == 1:
        src = SourceConfig(paths=paths, format="caption")
        image = ImageConfig(policy="fixed")
    else:
        src = SourceConfig(paths=paths, format="conversations")
        image = ImageConfig(policy="native")
    cfg = DataConfig(sources=[src], max_seq_len=SEQ, image=image, text=TextConfig(),
                     packing=PackingConfig(buffer_size=200),
                     reader=ReaderConfig(num_workers=workers, shuffle_buffer=200))
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, micro_batch_size=1, seed=0,
                                tokenizer=tok)

    def next_row():
        batch = next(loader)
        return len(batch.image_lens), batch.num_real_tokens

    r, bs = cfg.reader, cfg.image.decode_batch_size
    per_worker = (max(2, r.prefetch // bs) + 1) * bs  # queue depth + the batch being put
    result = _measure(next_row, max(1, workers) * per_worker + cfg.packing.buffer_size, window)
    loader.close()
    return result


# ----------------------------------------------------------------------------- S3
def start_s3(root: Path) -> tuple[object, str]:
    """moto's S3 server as a separate process on 127.0.0.1 (a free port), with the shards of
    ``root`` uploaded; returns (process, ``s3://bench/data``). Endpoint and credentials go
    into the standard AWS_* variables, which our reader (and its workers) take them from."""
    import socket
    import subprocess

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_REGION": "us-east-1"})
    client = boto3.client("s3")
    for _ in range(100):  # up to ~20 s for the server to listen
        try:
            client.create_bucket(Bucket="bench")
            break
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start on 127.0.0.1")
    for stage in (1, 2):
        for f in sorted((root / f"s{stage}").glob("*.tar")):
            client.upload_file(str(f), "bench", f"data/s{stage}/{f.name}")
    return proc, "s3://bench/data"


def main_s3(root: Path, tok: TextTokenizer, workers: int, rounds: int,
            window: tuple[int, float]) -> str:
    """Our loader over the same shards from local files and from S3 on loopback."""
    server, url = start_s3(root)
    acc = {(name, k): [0.0, 0.0] for name in ("local", "s3") for k in (1, 2)}
    try:
        for r in range(rounds):
            for stage in (1, 2):
                for name, where in (("local", root), ("s3", url)):
                    res = run_ours(where, tok, stage, workers, window)
                    acc[name, stage][0] += res["samples"]
                    acc[name, stage][1] += res["seconds"]
                    print(f"  round {r} stage{stage} {name}: "
                          f"{res['samples'] / res['seconds']:.1f} samples/s over "
                          f"{res['rows']} rows", flush=True)
    finally:
        server.kill()
        server.wait()
    ratios = [(acc["s3", k][0] / acc["s3", k][1]) / (acc["local", k][0] / acc["local", k][1])
              for k in (1, 2)]
    tot = {n: sum(acc[n, k][0] for k in (1, 2)) / sum(acc[n, k][1] for k in (1, 2))
           for n in ("local", "s3")}
    line = (f"BENCH s3_loader s3_vs_local={tot['s3'] / tot['local']:.3f} "
            f"s3_samples_per_s={tot['s3']:.1f} local_samples_per_s={tot['local']:.1f} "
            f"stage1_ratio={ratios[0]:.3f} stage2_ratio={ratios[1]:.3f} "
            f"window_rows={window[0]}")
    print(line, flush=True)
    return line


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="short windows (12 rows or 8 s): a smoke check, not the documented figures")
    p.add_argument("--workers", type=int, default=2, help="worker processes for both pipelines")
    p.add_argument("--rounds", type=int, default=None, help="alternating measurement rounds")
    p.add_argument("--data-dir", type=Path, default=None, help="where to generate/reuse data")
    p.add_argument("--s3", action="store_true",
                   help="our loader from S3 on loopback (moto server) vs local files, same "
                   "shards: ends in BENCH s3_loader s3_vs_local=<ratio>")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    n1, n2 = (1200, 500) if args.quick else (3000, 1200)
    window = (12, 8.0) if args.quick else (60, 30.0)
    rounds = args.rounds or (1 if args.quick else 2)
    root = args.data_dir or Path(tempfile.gettempdir()) / f"genlip_bench_{n1}_{n2}"
    make_data(root, n1, n2)
    tok = get_tokenizer(root)
    shards = {k: sorted(str(x) for x in (root / f"s{k}").glob("*.tar")) for k in (1, 2)}
    print(f"cores={os.cpu_count()} workers={args.workers} seq={SEQ} rounds={rounds} "
          f"tokenizer={tok.path}", flush=True)
    if args.s3:
        return main_s3(root, tok, args.workers, rounds, window)
    keys = ("samples", "seconds", "cpu", "real", "slots", "rows")
    acc = {(name, k): dict.fromkeys(keys, 0.0) for name in ("base", "ours") for k in (1, 2)}
    # Alternate baseline and ours, stage by stage, so background load hits both alike.
    for r in range(rounds):
        for stage in (1, 2):
            for name, run in (("base", lambda: run_baseline(shards[stage], tok, stage,
                                                            args.workers, window)),
                              ("ours", lambda: run_ours(root, tok, stage, args.workers,
                                                        window))):
                res = run()
                for k in keys:
                    acc[name, stage][k] += res[k]
                print(f"  round {r} stage{stage} {name}: "
                      f"{res['samples'] / res['seconds']:.1f} samples/s over {res['rows']} rows "
                      f"/ {res['seconds']:.1f} s after {res['warm']} warm-up rows", flush=True)
    speedups = []
    for stage in (1, 2):
        b, o = acc["base", stage], acc["ours", stage]
        sb, so = b["samples"] / b["seconds"], o["samples"] / o["seconds"]
        speedups.append(so / sb)
        print(f"stage{stage}: ours {so:7.1f} samples/s ({1e3 * o['cpu'] / o['samples']:.2f} CPU "
              f"ms/sample), fill {o['real'] / o['slots']:.4f} | baseline {sb:7.1f} samples/s "
              f"({1e3 * b['cpu'] / b['samples']:.2f} CPU ms/sample), fill "
              f"{b['real'] / b['slots']:.4f} | speedup {so / sb:.2f}x", flush=True)
    tot = {name: {k: sum(acc[name, s][k] for s in (1, 2)) for k in keys}
           for name in ("base", "ours")}
    ours_sps = tot["ours"]["samples"] / tot["ours"]["seconds"]
    base_sps = tot["base"]["samples"] / tot["base"]["seconds"]
    print(f"min per-stage speedup {min(speedups):.2f}x; baseline fill "
          f"{tot['base']['real'] / tot['base']['slots']:.4f} over full rows of {SEQ}")
    cpu = {name: 1e3 * tot[name]["cpu"] / tot[name]["samples"] for name in ("base", "ours")}
    line = (f"BENCH data_pipeline speedup={ours_sps / base_sps:.3f} "
            f"packing_efficiency={tot['ours']['real'] / tot['ours']['slots']:.5f} "
            f"samples_per_s={ours_sps:.1f} baseline_samples_per_s={base_sps:.1f} "
            f"stage1_speedup={speedups[0]:.3f} stage2_speedup={speedups[1]:.3f} "
            f"cpu_ms_per_sample={cpu['ours']:.2f} baseline_cpu_ms_per_sample={cpu['base']:.2f} "
            f"window_rows={window[0]}")
    print(line, flush=True)
    return line


if __name__ == "__main__":
    main()
