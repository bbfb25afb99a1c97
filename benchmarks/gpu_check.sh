#!/usr/bin/env bash
# The GPU check of the CIFAR-10 speedrun (benchmarks/README.md says how to call it), in three steps:
#   prepare   here, once per code change: CIFAR-10 as two transferable parts in .cifar/, and wheels
#             in .whl/ (pydantic and friends for Python 3.12, plus minitrain itself, which carries
#             the plugins' entry points). Both folders are git-ignored; nothing here is committed.
#   stage     device call 1 (carry .cifar/part1): keeps part 1 on the machine in /root/stage.
#   run       device call 2 (carry .cifar/part2 and .whl), right after call 1 while the machine is
#             warm: installs the wheels, rebuilds CIFAR-10 from both parts, runs the benchmark in
#             each of $VARIANTS (default: bf16 with the sync check, fp16, compiled, then
#             controls: CLI runs with amp, clip, accumulate, ema, compile, profile; also: muon),
#             $RUNS timed runs of each kind (default 10); figures in $OUT/<variant>.json.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
  py=${PYTHON:-.venv/bin/python}
  src=${CIFAR_SRC:-$HOME/.cache/minitrain/cifar10}
  [[ -f $src/cifar-10-batches-py/test_batch ]] || PYTHON=$py ../shared/tools/cifar10/get "$src"
  [[ -d .cifar/part2 ]] || $py ../shared/tools/cifar10/device-parts "$src" .cifar
  rm -rf .whl && mkdir .whl
  pins=$($py -m pip list --format=freeze 2>/dev/null \
    | grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions|pluggy|tqdm|torchmetrics|lightning[-_]utilities)==')
  platforms=""
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=" --platform $p"
  done
  # shellcheck disable=SC2086
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms -d .whl $pins
  $py -m pip wheel -q --no-deps --no-build-isolation -w .whl .
  du -sh .cifar/part1 .cifar/part2 .whl
  ;;
stage)
  mkdir -p /root/stage && rm -rf /root/stage/part1 && cp -r .cifar/part1 /root/stage/
  du -sh /root/stage/part1
  nvidia-smi -L
  ;;
run)
  site=$(mktemp -d)  # the wheels' install target, on the device machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH=$site PYTHONUNBUFFERED=1
  [[ -d /root/stage/part1 ]] || { echo "no /root/stage/part1: the machine was given back after call 1; run stage again" >&2; exit 2; }
  python3 .cifar/part2/build.py /root/cifar10 /root/stage/part1 .cifar/part2 >/dev/null
  for variant in ${VARIANTS:-bf16 fp16 compiled controls}; do  # VARIANTS="bf16 muon" runs just those
    case $variant in
      bf16) args=(--sync-debug) ;;
      fp16) args=(--plugin amp:dtype=fp16 --set data_dtype=fp16) ;;
      compiled) args=(--plugin compile) ;;
      muon) args=(--plugin compile --set muon=true) ;;
      controls)  # the training controls on the card: whole CLI runs of the quick recipe, 2 epochs each
        echo "=== controls"
        for plugins in "amp:dtype=fp16 clip:max_norm=2 accumulate:steps=2 ema:evaluate=true" \
                       "compile amp profile:wait=5,warmup=2,active=3"; do
          flags=(); for p in $plugins; do flags+=(--plugin "$p"); done
          echo "--- ${flags[*]}" | tee -a "$OUT/controls.log"
          python3 -m minitrain run recipes/cifar10_quick.py --set device="${DEVICE:-cuda}" --set data_dir=/root/cifar10 \
            --set epochs=2 --run-dir "$(mktemp -d)/run" "${flags[@]}" >>"$OUT/controls.log" 2>&1 \
            && tail -n 4 "$OUT/controls.log" || { tail -n 20 "$OUT/controls.log"; echo "=== controls failed"; }
        done
        continue ;;
      *) echo "unknown variant $variant" >&2; continue ;;
    esac
    echo "=== $variant"
    python3 benchmarks/speedrun.py --data-dir /root/cifar10 --runs "${RUNS:-10}" --log "$OUT/$variant.log" \
      --json "$OUT/$variant.json" "${args[@]}" || echo "=== $variant failed"
  done
  ;;
*)
  echo "usage: $0 prepare|stage|run" >&2
  exit 2
  ;;
esac
