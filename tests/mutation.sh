#!/usr/bin/env bash
# Mutation testing by hand (issue 19): mutmut 3 mutates the math, selection and scoring modules (pyproject.toml's
# [tool.mutmut]: knnlm, sweep, tasks/scoring, tasks/evaluate, analyses/projection, analyses/mlp) in a copy of the
# project under mutants/ and runs, for each mutant, the fast lane's tests (-m "not slow") that reach the mutated
# function. Then prints the score per module: killed / total. docs/testing.md has the last run's numbers and the
# survivors judged equivalent.
#
#   pip install -e '.[test,mutation]'
#   tests/mutation.sh                          # everything: hours on 2 cores
#   tests/mutation.sh 'workflow_scripts.knnlm*'  # one module (mutmut's name patterns); the rest keep their last result
#   tests/mutation.sh --score                  # only print the scores of the results in mutants/
#
# mutmut remembers results in mutants/ (git-ignored) and reruns only mutants of functions that changed;
# `rm -rf mutants` starts over. `mutmut show <name>` prints one mutant's diff, `mutmut browse` walks them.
# MUTMUT_CHILDREN: worker processes (default 2, the project's machines have 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" != "--score" ]]; then
  mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "$@" || true  # a non-zero exit still leaves the results
fi

results=$(mktemp)
trap 'rm -f "$results"' EXIT
mutmut results --all true > "$results"
python3 - "$results" <<'PY'
import collections
import re
import sys

# analyses/mlp.py: only its evaluation is in scope (issue 19); training the MLP is scored apart, out of the total
MLP_TRAINING = {"train", "train_on_datastore", "save", "train_mlp"}
DETECTED = {"killed", "timeout"}  # timeout: the mutant made the tests hang and the time limit caught it
by_module = collections.defaultdict(collections.Counter)
for line in open(sys.argv[1]):
    m = re.match(r"\s*(\S+)\.x(.+?)__mutmut_\d+: (.+)$", line.rstrip())
    if not m:
        continue
    module, func, status = m.groups()
    func = func.strip("_ǁ").split("ǁ")[-1]  # x_name, or xǁClassǁmethod
    if module.endswith("analyses.mlp"):
        module += " (training, out of scope)" if func in MLP_TRAINING else " (evaluation)"
    by_module[module][status] += 1
total = collections.Counter()
print(f"{'module':<52} {'killed':>7} {'total':>6} {'score':>7}  not killed")
for module in sorted(by_module):
    c = by_module[module]
    n, k = sum(c.values()), sum(c[s] for s in DETECTED)
    if "out of scope" not in module:
        total.update(c)
    rest = ", ".join(f"{s} {v}" for s, v in sorted(c.items()) if s not in DETECTED)
    print(f"{module:<52} {k:>7} {n:>6} {100 * k / n:>6.1f}%  {rest}")
n, k = sum(total.values()), sum(total[s] for s in DETECTED)
if n:
    rest = ", ".join(f"{s} {v}" for s, v in sorted(total.items()) if s not in DETECTED)
    print(f"{'in scope':<52} {k:>7} {n:>6} {100 * k / n:>6.1f}%  {rest}")
PY
