# How each rule runs its step. The command line, built from the named files of the rule (step, step_files); its
# conda env and code hash (wire_steps); the fixed resources of the profile (profile_resources); the outputs of a
# table or a figure (table, figure); a step split into chunks and joined (chunk_outputs, chunk_inputs).


# A step split into chunks (retrieval.chunks, tasks.chunks > 1): one job per chunk writes its part of the outputs,
# temporary, under <dir>/chunks/<i>/, and the job of the whole joins them (a cheap job); with one chunk, that job
# does all the work itself.
def chunk_outputs(outputs, d):
    """A chunk job's outputs: those of the job of the whole under <d>/ (`outputs`), under <d>/chunks/{chunk}/."""
    return {
        k: temp(v.replace(f"{d}/", f"{d}/chunks/{{chunk}}/", 1))
        for k, v in outputs.items()
    }


def chunk_inputs(n, d, read, keep):
    """For unpack(): what the job of the whole reads from its n chunks under <d> (`chunks`, the file `read` of each
    chunk), and (`chunk_files`) their other files, `keep`, so that the temporary chunks stay until it has read
    them; nothing when n is 1."""

    def inputs(wildcards):
        if n == 1:
            return {}
        dirs = [
            f"{d.format(**dict(wildcards.items()))}/chunks/{i:03d}" for i in range(n)
        ]
        return {
            "chunks": [f"{c}/{read}" for c in dirs],
            "chunk_files": [f"{c}/{k}" for c in dirs for k in keep],
        }

    return inputs


def step(name, *extra):
    """The shell command running step `name`, `python -m workflow_scripts <name>` (workflow_scripts/cli.py), with
    --params from the rule's param p and --threads from its param threads when the step takes them, then `extra`
    (arguments that are no file of the rule), then params.args (wire_steps): every argument of the step that is a
    named input or output of the rule, each path quoted. The step's stderr goes to the rule's log.
    """
    args = _cli.step_arguments(name)
    return " ".join(
        [f"python -m workflow_scripts {name}"]
        + (["--params {params.p:q}"] if "params" in args else [])
        + (["--threads {params.threads}"] if "threads" in args else [])
        + [*extra, "{params.args} 2> {log}"]
    )


# names Snakemake keeps for its own methods, and the names of the inputs and outputs that stand for them
RESERVED = {"keys": "key_shards", "items": "task_items"}


def step_files(rule, name, given=()):
    """The function behind params.args of `rule`, which runs step `name`: `--arg PATH ...` for each path argument
    of the step that is a named output or input of the rule (or its RESERVED stand-in), but those in `given`
    (written in the shell), in the step's order, each path quoted; an optional argument without a file is left
    out. It reads input and output, so Snakemake's params rerun trigger leaves it out (the input trigger compares
    the files)."""
    paths = {
        a: required
        for a, (kind, required) in _cli.step_arguments(name).items()
        if kind in ("path", "paths") and a not in given
    }

    def args(wildcards, input, output):
        flags = []
        for a, required in paths.items():
            named = [
                f[n]
                for f in (input, output)
                for n in (a, RESERVED.get(a))
                if n in f.keys()
            ]
            if len(named) > 1:
                raise WorkflowError(f"Rule {rule}: {a} is both an input and an output")
            files = named[0] if named else []
            files = [files] if isinstance(files, str) else list(files)
            if files:
                flags.append(f"--{a.replace('_', '-')} {shlex.join(map(str, files))}")
            elif required:
                raise WorkflowError(
                    f"Rule {rule}: step {name} needs --{a.replace('_', '-')}, which is no named input or "
                    f"output of the rule"
                )
        return " ".join(flags)

    return args


def table(path, caption=None, category=None, subcategory=None, labels=None, name=""):
    """A table's outputs: <path>.csv, in the report under ../report/<caption>.rst when a caption is given, and
    <path>.parquet; named csv and parquet, or <name>_csv and <name>_parquet."""
    csv = f"{path}.csv"
    if caption:
        csv = report(csv, f"../report/{caption}.rst", category, subcategory, labels)
    key = f"{name}_" if name else ""
    return {f"{key}csv": csv, f"{key}parquet": f"{path}.parquet"}


def figure(path, caption, category, subcategory=None, labels=None):
    """A figure's outputs: results/figures/<path>.png, in the report under ../report/<caption>.rst, and
    results/figures/<path>.pdf."""
    path = f"results/figures/{path}"
    png = report(
        f"{path}.png", f"../report/{caption}.rst", category, subcategory, labels
    )
    return {"png": png, "pdf": f"{path}.pdf"}


PROFILE = Path(workflow.basedir) / "profiles/default/config.yaml"


def profile_resources(rules):
    """The rules' fixed resources, set-resources in profiles/default/config.yaml: Snakemake applies them, but a
    --set-resources on the command line or in another profile replaces that list as a whole; so each resource of
    the profile's that a rule lacks is set here, under what the command line gave."""
    fixed = _config.read_yaml(PROFILE).get("set-resources") or {}
    for r in rules:
        have = {
            k.split("_")[0] for k in r.resources.keys()
        }  # mem_mb, mem, mem_mib: one resource
        r.resources.update(
            {
                k: v
                for k, v in fixed.get(r.name, {}).items()
                if k.split("_")[0] not in have
            }
        )


# Steps that only read tables and draw or write them: they run in the plotting env (no torch).
PLOTTING_STEPS = ("figure-", "paper2-comparison", "results-doc", "stage-times")


def wire_steps(rules):
    """Adds to each rule running a step (`python -m workflow_scripts <step>`) the param `code`, the hash of the step's
    import closure (workflow_scripts/cli.py), so that with the params rerun trigger editing a module reruns exactly
    the rules whose step imports it, directly or not; unless the rule sets it, the param `threads` of a step taking
    --threads: the rule's rule_threads when the config names it, else ARITHMETIC_THREADS where the rule asks for more
    than one thread, else 1 (a param, so that a new value reruns the jobs; a rule computing on more threads than it
    asks for is named, with the --set-threads that gives them); the param `args`, its files as the step's arguments
    (step_files); and, unless it names one, its conda env: GPU_ENV for a rule with a `gpu` resource, the plotting env for
    PLOTTING_STEPS, else the pipeline env."""
    for r in rules:
        m = re.search(r"python -m workflow_scripts (\S+)", r.shellcmd or "")
        if not m:
            continue
        r.set_params(code=_cli.code_hash(m[1]))
        if "threads" in _cli.step_arguments(m[1]) and "threads" not in r.params.keys():
            asked = r.resources["_cores"]
            asked = getattr(asked, "raw", asked)
            n = RULE_THREADS.get(r.name, ARITHMETIC_THREADS if asked > 1 else 1)
            if isinstance(asked, int) and n > asked:
                logger.warning(
                    f"{r.name} computes on {n} threads (rule_threads or arithmetic_threads) but asks the "
                    f"scheduler for {asked}; give it as many, --set-threads {r.name}={n}"
                )
            r.set_params(threads=n)
        if "{params.args}" in r.shellcmd:
            given = re.findall(r"--([a-z][\w-]*)", r.shellcmd)
            r.set_params(
                args=step_files(r.name, m[1], {g.replace("-", "_") for g in given})
            )
        if r.conda_env is None:
            r.conda_env = (
                GPU_ENV
                if "gpu" in r.resources.keys()
                else (
                    "../envs/plotting.yaml"
                    if m[1].startswith(PLOTTING_STEPS)
                    else "../envs/pipeline.yaml"
                )
            )
