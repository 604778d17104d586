"""The whole DAG at real size: `dvc repro` with configs/realsize.yaml in a temporary copy.

The whole CLIP ViT-B/32 (both towers, a CLIP BPE tokenizer) and GPT-2 small built from
their default configs (random weights, the real compute), a byte-level BPE tokenizer
trained on the captions and loaded through GPT2TokenizerFast, GPT-2's 50,257-row
embedding and LM head, generated photo-like 640x480 JPEGs. The repository (tracked
and new files, not data/) is copied into a temporary folder with one git commit; the
profile is applied with `capline params apply`; each stage then runs as
`dvc repro -s STAGE`, in DAG order, timed, with the peak RSS of its biggest process
(wait4's ru_maxrss over the process and the children it waited for: dvc, the stage
command, its loader workers).

Throughputs are the stages' own metrics: embed images/s, train (image, caption)
pairs/s, generate captions/s. There is no reference to beat here: it proves that
the real-size path runs, and what it costs. The last line printed is a JSON object.

    python bench/realsize.py                      # the profile as shipped (within 15 min on 2 cores)
    python bench/realsize.py --images 40 --epochs 1 --keep /tmp/rs   # smaller; keep the copy
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.core.files import read_metrics  # noqa: E402  (the checkout, on the path above)

STAGES = ("prepare", "model_clip", "model_gpt", "download", "embed_plan", "embed", "datastore", "retrieve", "train",
          "scst", "generate", "generate_xe", "transfer", "evaluate")


def copy_repository(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files (what a clone plus the work in progress holds)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and not rel.startswith("data/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def environment(repo: Path) -> dict:
    env = dict(os.environ)
    # `capline` and `dvc` live beside this interpreter; the copy's code is the one imported.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(repo)
    env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@invalid", GIT_COMMITTER_NAME="bench",
               GIT_COMMITTER_EMAIL="bench@invalid", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run(cmd: list[str], repo: Path, log: Path) -> tuple[float, float]:
    """Run ``cmd``; return (seconds, peak RSS MiB of its biggest process). Fails loudly."""
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=repo, env=environment(repo), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"realsize: {' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, help="generated images (the profile: 300)")
    ap.add_argument("--epochs", type=int, help="training epochs (the profile: 1)")
    ap.add_argument("--batch-size", type=int, help="training batch size (the profile: 6)")
    ap.add_argument("--max-new-tokens", type=int, help="caption length cap (the profile: 20)")
    ap.add_argument("--keep", type=Path, help="build the copy here and keep it (default: a temporary folder)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a param on top of the profile, as dvc exp run -S takes it (e.g. mapper.type=clipgpt); "
                         "repeatable")
    args = ap.parse_args()

    reduce: dict = {}
    if args.images:
        reduce.setdefault("data", {})["demo"] = {"images": args.images}
    if args.epochs:
        reduce.setdefault("train", {})["epochs"] = args.epochs
        reduce.setdefault("scst", {})["epochs"] = args.epochs
    if args.batch_size:
        reduce.setdefault("train", {})["batch_size"] = args.batch_size
    if args.max_new_tokens:
        reduce.setdefault("generate", {})["max_new_tokens"] = args.max_new_tokens
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"realsize: --set {item!r}: expected KEY=VALUE")
        *sections, name = key.split(".")
        node = reduce
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = yaml.safe_load(value)

    tmp = None
    if args.keep:
        if args.keep.exists() and any(args.keep.iterdir()):
            raise SystemExit(f"realsize: --keep {args.keep} exists and is not empty")
        repo = args.keep
        repo.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="capline-realsize-")
        repo = Path(tmp.name)
    try:
        copy_repository(repo)
        log = repo / "realsize.log"
        recipes = ["configs/realsize.yaml"]
        if reduce:
            (repo / "reduce.yaml").write_text(yaml.safe_dump(reduce))
            recipes.append("reduce.yaml")
        run([sys.executable, "-m", "stages.cli", "params", "apply", *recipes], repo, log)
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "realsize"]):
            run(cmd, repo, log)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        print(f"realsize: {params['data']['demo']['images']} images 640x480, ViT-B/32 + GPT-2 small (random), "
              f"{params['mapper']['type']} mapper {params['mapper']['layers']} layers, train {params['train']['epochs']} "
              f"epochs of batch {params['train']['batch_size']}, beam {params['generate']['num_beams']} x "
              f"{params['generate']['max_new_tokens']} tokens; {os.cpu_count()} CPUs; copy in {repo}", flush=True)

        stages = {}
        total = time.perf_counter()
        for stage in STAGES:
            seconds, rss = run(["dvc", "repro", "-s", stage], repo, log)
            stages[stage] = {"seconds": round(seconds, 1), "peak_rss_mib": round(rss)}
            print(f"  {stage:<11} {seconds:7.1f} s   peak RSS {rss:6.0f} MiB", flush=True)
        total = time.perf_counter() - total

        metrics = {name: read_metrics(repo / "data" / "metrics" / f"{name}.json")
                   for name in ("embed", "train", "scst", "generate", "eval")}
        result = {
            "bench": "realsize",
            "embed_images_per_s": metrics["embed"]["images_per_s"],
            "train_samples_per_s": metrics["train"]["samples_per_s"],
            "scst_sampled_captions_per_s": metrics["scst"]["sampled_captions_per_s"],
            "generate_captions_per_s": metrics["generate"]["captions_per_s"],
            "peak_rss_mib": max(s["peak_rss_mib"] for s in stages.values()),
            "total_s": round(total, 1),
            "images": metrics["embed"]["images"],
            "train_steps": metrics["train"]["steps"],
            "scst_steps": metrics["scst"]["steps"],
            "captions": metrics["generate"]["captions"],
            "clip_s": metrics["eval"].get("clip_s"),  # random weights: proves the path, says nothing of quality
            "device": metrics["train"]["device"],
            "precision": {k: metrics[k]["precision"] for k in ("embed", "train", "scst", "generate")},
            "stages": stages,
        }
        print(f"total {total:.1f} s; embed {result['embed_images_per_s']} images/s, train "
              f"{result['train_samples_per_s']} pairs/s ({result['train_steps']} steps), scst "
              f"{result['scst_sampled_captions_per_s']} sampled captions/s ({result['scst_steps']} steps), generate "
              f"{result['generate_captions_per_s']} captions/s; peak RSS {result['peak_rss_mib']} MiB")
        print(json.dumps(result))
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
