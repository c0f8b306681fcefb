"""UCIR (Hou et al., CVPR 2019) in a plain Avalanche script, without recipes or the runner.

Avalanche's ``Naive`` strategy + cl-ext's herding exemplar memory + ``UCIRPlugin``, on an
Avalanche class-incremental benchmark built from scikit-learn's 8x8 digits (5 experiences
of 2 classes). Scores the cosine head (CNN) and the nearest-mean-of-exemplars classifier
after every experience. Takes about 10 s of CPU time; from a checkout, with cl-ext
installed (``pip install -e .``) or on the path::

    PYTHONPATH=. python examples/ucir_avalanche.py
"""

from __future__ import annotations

import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from cl_ext.benchmarks.common import ArrayDataset
from cl_ext.memory import ExemplarMemory, ExemplarMemoryPlugin
from cl_ext.metrics import IncrementalAccuracy, NMEAccuracy
from cl_ext.models import MLP, IncrementalNet, linear_head, use_cosine_head
from cl_ext.plugins import UCIRPlugin
from cl_ext.randomness import isolated
from cl_ext.training import PhaseSchedule


def digits_benchmark(n_experiences: int = 5, seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    # class_ids_from_zero_from_first_exp: output unit k is the k-th class learned, so the
    # classes of each new experience are the newest units of the growing head.
    return nc_benchmark(
        ArrayDataset(x_train, y_train),
        ArrayDataset(x_test, y_test),
        n_experiences=n_experiences,
        task_labels=False,
        seed=seed,
        class_ids_from_zero_from_first_exp=True,
    )


def main(epochs: int = 10, finetune_epochs: int = 20, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    benchmark = digits_benchmark(seed=seed)
    initial_classes = len(benchmark.train_stream[0].classes_in_this_experience)
    model = IncrementalNet(MLP(64, [128, 128]), 128, linear_head(128, initial_classes))
    use_cosine_head(model)  # before building the optimizer, so it holds the cosine head's parameters
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    memory = ExemplarMemory(per_class=20, selection="herding")
    ucir = UCIRPlugin(
        memory,
        lambda_base=5.0,
        cb_finetune=True,  # the class-balanced finetuning of the authors' ImageNet-Full run
        finetune=PhaseSchedule(epochs=finetune_epochs, lr=0.01, momentum=0.9, weight_decay=5e-4, milestones=[10]),
        finetune_batch_size=32,
        seed=seed,
    )
    cnn, nme = IncrementalAccuracy(), NMEAccuracy(memory)
    strategy = Naive(
        model=model,
        optimizer=optimizer,
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=32,
        train_epochs=epochs,
        eval_mb_size=256,
        # The memory plugin goes first: UCIR's class-balanced finetuning needs the memory
        # already updated with the new classes.
        plugins=[ExemplarMemoryPlugin(memory), ucir],
        evaluator=EvaluationPlugin(cnn, nme, loggers=[]),
    )
    for t, experience in enumerate(benchmark.train_stream):
        strategy.train(experience)
        with isolated():  # evaluating leaves the training randomness alone
            strategy.eval(benchmark.test_stream[: t + 1])
    return {"cnn": cnn.results(), "nme": nme.results(), "ucir": ucir.summary()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    results = main()
    print("step  classes   CNN acc   NME acc   lambda   eta")
    for t, step in enumerate(results["ucir"]["steps"]):
        cnn_acc, nme_acc = results["cnn"]["seen_accuracy"][t], results["nme"]["seen_accuracy"][t]
        lam = f"{step['lambda']:.2f}" if "lambda" in step else "  -  "
        classes = step["n_old"] + step["n_new"]
        print(f"{t:>4}  {classes:>7}   {cnn_acc:7.2%}   {nme_acc:7.2%}   {lam:>6}   {step['eta']:.2f}")
    print(
        f"average incremental accuracy: CNN {results['cnn']['average_incremental_accuracy']:.2%}, "
        f"NME {results['nme']['average_incremental_accuracy']:.2%}"
    )
