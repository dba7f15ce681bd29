"""The names of merge_lora.py's combinations (declared without torch: the script's parser lists them before
torch loads); their rules are in combine.py."""
FACTOR_RULES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_RULES = {"svd": "linear", "ties_svd": "ties", "dare_linear_svd": "dare_linear", "dare_ties_svd": "dare_ties",
             "magnitude_prune_svd": "magnitude_prune"}
KNOTS_RULES = {"knots_linear": "linear", "knots_ties": "ties", "knots_dare_linear": "dare_linear",
               "knots_dare_ties": "dare_ties"}
COMBINATIONS = (*FACTOR_RULES, "cat", *SVD_RULES, *KNOTS_RULES)
