#!/usr/bin/env bash
# One call on a lent GPU machine: build the kernels there, then the stages named on the command line, with
# every log under $OUT (the device tool brings it back).
#   bash benchmarks/gpu_session.sh env build tests sanitize train kernels speed phase
# Stages: env (GPU, torch, compilers, CPU), crashcheck (a native backtrace of a crash in test_bad_input.py), build (setup.py build_ext --inplace for sm_90), tests (whole suite, CUDA tests must not skip),
# sanitize (compute-sanitizer memcheck and racecheck over the CUDA op tests), train (EDropout on digits on
# the GPU, report printed), kernels (benchmarks/kernels.py), speed (benchmarks/speed.py with profiles),
# phase (benchmarks/dropout_phase.py on Fashion-MNIST for each of PHASE_SEEDS; the data from
# $EDROPOUT_SYSTEM_DATA/fashion-mnist, carried with the call), released (ours against the released code's
# choices, one at a time and as --preset reference, on digits (the command's schedule, six runs at once)
# and on Fashion-MNIST (the README's short schedule, seed 0: ours with each stem, the preset), run
# directories without checkpoints in $OUT/released.tgz).
# Stages run one after another; for two at once, call the script twice (e.g. tests in the background).
# Stage time limits: TEST_SECONDS, SANITIZE_SECONDS, TRAIN_SECONDS, BENCH_SECONDS, PHASE_SECONDS (per seed);
# extra arguments: TEST_ARGS (default: the whole suite), SANITIZE_TESTS, KERNELS_ARGS, SPEED_ARGS,
# PHASE_ARGS. At most 8 files come back from $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/edropout-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
status=0
stage() { echo "=== $1 ($(date +%T))"; }
fail() { echo "!!! $1 failed"; status=1; }

for s in "$@"; do
  case "$s" in
    env)
      stage env
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
      $PY -c "import torch, sysconfig; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'CXX', sysconfig.get_config_var('CXX'))"
      for c in g++ /opt/gcc/bin/g++; do command -v $c && $c --version | head -1; done
      lscpu | grep -E "Model name|^CPU\(s\)" ;;
    crashcheck)  # a crash in the argument checks: its native backtrace
      stage crashcheck
      if ! $PY -m pytest -q -x -p no:cacheprovider tests/test_bad_input.py >/tmp/crashcheck.log 2>&1; then
        tail -3 /tmp/crashcheck.log
        cuda-gdb -q -batch -ex run -ex bt --args $PY -m pytest -q -x -p no:cacheprovider tests/test_bad_input.py 2>&1 \
          | grep -E "^#|signal" | head -30
      fi ;;
    build)
      stage build
      # The system compiler: the image's own g++ wrapper links libstdc++ statically into the extension,
      # whose iostreams then crash in the first number formatted (an error message).
      CXX=/usr/bin/g++ CC=/usr/bin/gcc TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FORCE_CUDA=1 \
        timeout 120 $PY setup.py build_ext --inplace >/tmp/build.log 2>&1 \
        || { tail -40 /tmp/build.log; echo "!!! build failed"; exit 1; }
      grep -iE "warning|spill" /tmp/build.log | grep -v "UserWarning" | head -20
      ldd edropout/_C*.so | grep -E "stdc" ;;
    tests)
      stage tests
      timeout ${TEST_SECONDS:-150} $PY -m pytest -v -rfs -n 8 --timeout 90 -p no:cacheprovider -p no:benchmark ${TEST_ARGS:-tests} \
        >"$OUT/tests.log" 2>&1 || fail tests
      grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -25 ;;
    sanitize)
      for tool in memcheck racecheck; do
        stage "sanitize $tool"
        # Only edropout's kernels are instrumented (torch's and cuBLAS's, used by the references, are not).
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SANITIZE_SECONDS:-100} compute-sanitizer --tool $tool \
          --kernel-name kns=edropout --error-exitcode 99 \
          $PY -m pytest -q -x -p no:cacheprovider -k cuda ${SANITIZE_TESTS:-tests/test_ising_energy.py \
          tests/test_evolve.py tests/test_select.py tests/test_evolve_step.py} >"$OUT/sanitize-$tool.log" 2>&1 \
          || fail "sanitize $tool"
        grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitize-$tool.log" | tail -3
      done ;;
    train)
      stage train
      rm -rf /tmp/run-digits
      timeout ${TRAIN_SECONDS:-120} $PY -m edropout train --device cuda --run-dir /tmp/run-digits >"$OUT/train.log" 2>&1 \
        || fail train
      tail -25 "$OUT/train.log" ;;
    kernels)
      stage kernels
      timeout ${BENCH_SECONDS:-300} $PY benchmarks/kernels.py --device cuda ${KERNELS_ARGS:-} --json "$OUT/kernels-cuda.json" 2>&1 \
        | tee "$OUT/kernels-cuda.md" || fail kernels ;;
    speed)
      stage speed
      rm -rf /tmp/profile
      timeout ${BENCH_SECONDS:-300} $PY benchmarks/speed.py --device cuda --energy ising,loss ${SPEED_ARGS:-} \
        --json "$OUT/speed-cuda.json" --profile /tmp/profile 2>&1 | tee "$OUT/speed-cuda.md" || fail speed
      tar czf "$OUT/profiles.tgz" -C /tmp/profile . ;;
    phase)
      stage phase
      for seed in ${PHASE_SEEDS:-0 1 2}; do
        timeout ${PHASE_SECONDS:-300} $PY benchmarks/dropout_phase.py /tmp/phase-seed$seed --seed $seed ${PHASE_ARGS:-} \
          --out /tmp/phase-seed$seed.md >>"$OUT/phase.log" 2>&1 || fail "phase seed $seed"
        cat /tmp/phase-seed$seed.md >>"$OUT/phase.md" 2>/dev/null
      done
      grep -E "^\| [a-z]" "$OUT/phase.log" ;;
    released)
      stage released
      R=/tmp/released; rm -rf $R; mkdir -p $R
      keep() { tar czf "$OUT/released.tgz" --exclude="*.pt" -C $R .; }  # after each run: a cut call keeps the rest
      FASHION="--dataset fashion --epochs 10 --limit-batches 60 --batch-size 128 --lr-step 3 --seed 0 --device cuda --quiet"
      declare -A digits=([ours]="" [stem-cifar]="--stem cifar" [energy-margin]="--energy margin"
                         [prunable-reference]="--prunable reference" [freeze-reference]="--freeze reference"
                         [preset-reference]="--preset reference")
      for name in "${!digits[@]}"; do  # at once, with the first Fashion run: accuracies, their seconds shared
        timeout ${TRAIN_SECONDS:-240} $PY -m edropout train --device cuda --quiet ${digits[$name]} \
          --run-dir $R/digits-$name >$R/digits-$name.log 2>&1 &
      done
      timeout ${TRAIN_SECONDS:-240} $PY -m edropout train $FASHION --compare-original --run-dir $R/fashion-ours \
        >$R/fashion-ours.log 2>&1 &
      wait; keep
      for run in "fashion-ours-cifar --stem cifar --compare-original" \
                 "fashion-reference --preset reference --original-dir $R/fashion-ours-cifar/original"; do
        set -- $run; name=$1; shift
        timeout ${TRAIN_SECONDS:-240} $PY -m edropout train $FASHION "$@" --run-dir $R/$name >$R/$name.log 2>&1 \
          || fail "released $name"
        keep
      done
      for f in $R/*/report.md $R/*.log; do echo "--- $f"; grep -E "^\|" "$f" || tail -3 "$f"; done
      $PY benchmarks/kept_as_published.py $R/fashion-ours $R/fashion-ours-cifar $R/fashion-reference \
        $R/digits-ours $R/digits-preset-reference 2>&1 | tee $R/kept-as-published.md
      keep ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
stage done
exit $status
