# Helpers of rules/mlp.smk: the params and inputs its rules compute from the config.


def mlp_eval_params(wildcards):
    return as_json(
        {
            "datastore": MLP["datastore"],
            "eval_sets": sorted(EVAL_SETS),
            "choose_on": select_on(MLP["datastore"]) or sorted(EVAL_SETS)[0],
            "lambdas": MLP["lambdas"],
        }
    )
