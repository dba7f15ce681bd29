"""Losses, the multitask model, optimiser groups, batching and the checkpoint naming rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from glue_helpers import write_word_tokenizer
from utils.glue.data import GlueSplit, load_glue_config
from utils.glue.checkpoints import checkpoint_name, task_learning_rate
from utils.glue.search import expand_grid, setting_name
from utils.glue.training import MultiTaskModel, batch_loss, encode_split, make_loader, training_arguments, training_history

CONFIG = load_glue_config()
ROWS = {"stsb": CONFIG["tasks"]["stsb"], "mnli": CONFIG["tasks"]["mnli"]}


def test_multitask_loss_is_the_sum_of_task_losses():
    logits = torch.tensor([[0.5, -1000.0, -1000.0], [1.0, 2.0, 0.0], [0.2, 0.1, 0.3], [2.0, -1000.0, -1000.0]])
    batch = {"labels": torch.tensor([1.0, 1.0, 2.0, 1.5]), "dataset_ids": torch.tensor([3, 5, 5, 3])}
    expected = F.mse_loss(torch.tensor([0.5, 2.0]), torch.tensor([1.0, 1.5])) + F.cross_entropy(logits[[1, 2]], torch.tensor([1, 2]))
    assert batch_loss(logits, batch, ROWS).item() == pytest.approx(expected.item())
    single = batch_loss(logits[[1, 2], :2], {"labels": torch.tensor([1, 0])}, {"rte": CONFIG["tasks"]["rte"]})
    assert single.item() == pytest.approx(F.cross_entropy(logits[[1, 2], :2], torch.tensor([1, 0])).item())


def test_multitask_model_pads_narrow_heads():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    model = MultiTaskModel(encoder, ROWS).eval()
    ids = torch.tensor([[2, 5, 3], [2, 6, 3]])
    logits = model(ids, torch.ones_like(ids), dataset_ids=torch.tensor([3, 5]))
    assert logits.shape == (2, 3) and logits[0, 1:].tolist() == [-1000.0, -1000.0]
    pooled = encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).pooler_output
    assert torch.allclose(logits[1], model.heads["mnli"](pooled[1:])[0], atol=1e-6)


def test_trainer_gets_the_original_training_arguments(tmp_path):
    """The original's TrainingArguments: LR, warm-up ratio 0.06, weight decay 0.01, epochs, batch size,
    evaluation and saving each epoch, best epoch restored on the validation score, group_by_length option."""
    from types import SimpleNamespace

    options = SimpleNamespace(num_epochs=3, batch_size=16, group_by_length=True, report_to=(), progress=False, precision="fp32")
    args = training_arguments(options, CONFIG, 5e-5, 43, tmp_path / "work", torch.device("cpu"))
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size, args.per_device_eval_batch_size) == (5e-5, 3, 16, 16)
    assert args.get_warmup_steps(100) == 6 and args.get_warmup_steps(101) == 7           # ceil(0.06 · T)
    assert (args.weight_decay, args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.max_grad_norm) == (0.01, 0.9, 0.999, 1e-8, 1.0)
    assert args.lr_scheduler_type == "linear" and args.optim == "adamw_torch_fused" and args.seed == 43
    assert args.eval_strategy == "epoch" and args.save_strategy == "epoch" and args.load_best_model_at_end
    assert args.metric_for_best_model == "main_score" and args.greater_is_better
    assert args.train_sampling_strategy == "group_by_length" and not args.bf16 and not args.fp16 and args.use_cpu
    options.group_by_length = False
    assert training_arguments(options, CONFIG, 1e-5, 42, tmp_path, torch.device("cpu")).train_sampling_strategy == "random"


def test_training_history_from_the_trainer_log():
    log = [
        {"loss": 0.7, "epoch": 1.0, "step": 6},
        {"eval_mrpc_loss": 0.6, "eval_mrpc_accuracy": 0.5, "eval_mrpc_runtime": 1.0, "eval_mrpc_samples_per_second": 9.0, "epoch": 1.0, "step": 6},
        {"eval_stsb_loss": 2.0, "eval_stsb_pearson": 0.1, "epoch": 1.0, "step": 6},
        {"eval_main_score": 0.3, "epoch": 1.0, "step": 6},
        {"loss": 0.5, "epoch": 2.0, "step": 12},
        {"eval_mrpc_loss": 0.4, "eval_mrpc_accuracy": 0.75, "epoch": 2.0, "step": 12},
        {"eval_stsb_loss": 1.0, "eval_stsb_pearson": 0.2, "epoch": 2.0, "step": 12},
        {"eval_main_score": 0.475, "epoch": 2.0, "step": 12},
        {"train_runtime": 3.0, "train_loss": 0.6, "epoch": 2.0, "step": 12},
    ]
    history = training_history(log, ["mrpc", "stsb"])
    assert [h["epoch"] for h in history] == [1, 2] and [h["train_loss"] for h in history] == [0.7, 0.5]
    assert history[0]["validation"] == {"mrpc": {"loss": 0.6, "accuracy": 0.5}, "stsb": {"loss": 2.0, "pearson": 0.1}}
    assert history[1]["validation_score"] == 0.475


def test_no_hand_written_training_loop_is_left():
    import utils.glue.training as training

    for name in ("train_model", "optimizer_groups", "TrainingSettings", "LengthGroupedSampler"):
        assert not hasattr(training, name), name
    assert "Trainer" in [base.__name__ for base in training.make_trainer_class().__mro__]


def test_eval_batches_cover_every_example_once(tmp_path):
    from transformers import AutoTokenizer

    write_word_tokenizer(tmp_path, ["a", "b"])
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    split = GlueSplit("sst2", "test", ["a " * n for n in (3, 1, 5, 2, 4)], None, np.arange(5))
    loader = make_loader(encode_split(tokenizer, split, CONFIG["tasks"]["sst2"], 128), tokenizer, 2, shuffle=False)
    labels = torch.cat([batch["labels"] for batch in loader]).tolist()
    assert sorted(labels) == [0, 1, 2, 3, 4] and labels[0] == 2  # longest first
    assert [batch["input_ids"].shape[1] for batch in loader] == [7, 5, 3]


def test_checkpoint_names_and_learning_rate_table():
    assert checkpoint_name("roberta-base", 1e-5) == "roberta-base_lr1e-05"
    assert checkpoint_name("bert-base-uncased", 5e-5, run=2) == "bert-base-uncased_lr5e-05_run2"
    assert task_learning_rate(CONFIG, "bert-base-uncased", "cola", None) == 5e-5
    assert task_learning_rate(CONFIG, "roberta-base", "cola", None) == 1e-5
    assert task_learning_rate(CONFIG, "unknown-model", "rte", None) == 1e-5
    assert task_learning_rate(CONFIG, "roberta-base", "rte", 3e-5) == 3e-5


def test_paper_grids():
    grids = CONFIG["merge_grids"]["paper"]
    assert len(expand_grid(grids["task_arithmetic"], "ta")) == 6
    assert len(expand_grid(grids["fisher_merging"], "fisher")) == 24
    assert len(expand_grid(grids["regmean_merging"], "regmean")) == 16
    assert len(expand_grid(grids["ties_merging"], "ties")) == 18
    assert [s["weight_mask_rate"] for s in expand_grid(grids["mask_merging"], "mask")] == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert setting_name({"scaling_coefficient": 0.3, "nums": [256, 512]}) == "scaling_coefficient_0.3_nums_256_512"
    with pytest.raises(ValueError, match="empty grid: axis 'x' of here"):
        expand_grid({"x": []}, "here")


def test_result_names_follow_the_original():
    from model_merging_methods import DareOptions
    from utils.glue.inference import result_name
    from utils.glue.search import FlagSetting, MergeRunOptions, MethodOptions, result_suffix

    assert result_name("roberta-base_lr1e-05", DareOptions(drop_rate=0.0), 0) == "roberta-base_lr1e-05_inference_mask_0.0"
    assert result_name("m_lr1e-05", DareOptions(drop_rate=0.9, rescale=False), 0) == "m_lr1e-05_inference_mask_0.9_rescale_False"
    variant = DareOptions(drop_rate=0.1, rescale=True, strategy="magnitude", weight_format="finetuned_weight")
    assert result_name("m", variant, 3) == "m_inference_mask_0.1_rescale_True_strategy_magnitude_weight_format_finetuned_weight_seed3"

    def suffix(method, dare, grid="paper", select_on="validation", **kwargs):
        options = MergeRunOptions("m", (("mrpc", "stsb"),), method, "task_arithmetic", grid, select_on, dare, FlagSetting(), MethodOptions(),
                                  0, None, 16, 128, None, None, None, ".", False, False, {})
        return result_suffix(options, **kwargs)

    assert suffix("task_arithmetic", DareOptions(drop_rate=0.5, rescale=False)) == ""
    assert suffix("mask_merging", DareOptions(drop_rate=0.5, rescale=True)) == ""
    assert suffix("mask_merging", DareOptions(rescale=False, strategy="magnitude"), grid="small", select_on="test") == \
        "_grid_small_select_on_test_rescale_False_strategy_magnitude"
    assert suffix("mask_merging", variant, grid="none") == "_grid_none_strategy_magnitude_weight_format_finetuned_weight"
    assert suffix("mask_merging", variant, grid="none", for_apply_method=True) == "_grid_none"


def test_checkpoint_paths(tmp_path):
    from utils.glue.checkpoints import checkpoint_dir, task_checkpoint

    assert checkpoint_dir(tmp_path, ["cola", "sst2"], "m_lr1e-05_run2") == tmp_path / "save_models" / "cola_sst2" / "m_lr1e-05_run2"
    with pytest.raises(FileNotFoundError, match="checkpoint of task 'cola' not found: .*save_models/cola/bert-base-uncased_lr5e-05"):
        task_checkpoint(tmp_path, CONFIG, "org/bert-base-uncased", "cola", None)
    (tmp_path / "save_models" / "rte" / "m_lr3e-05").mkdir(parents=True)
    assert task_checkpoint(tmp_path, CONFIG, "m", "rte", 3e-5) == tmp_path / "save_models" / "rte" / "m_lr3e-05"


def test_glue_scripts_take_only_main_from_entry_scripts():
    """Scripts never import each other: scripts/glue_*.py may take an entry script's main, nothing else."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    entry = {path.stem for path in root.glob("*.py")}
    for path in [*root.glob("*plms_glue.py"), *(root / "scripts").glob("glue_*.py"), *(root / "utils" / "glue").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in entry:
                assert path.parent.name == "scripts" and [alias.name for alias in node.names] == ["main"], (path, node.module)
            if isinstance(node, ast.Import):
                assert not {alias.name for alias in node.names} & entry, path
