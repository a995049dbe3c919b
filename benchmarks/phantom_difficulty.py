"""How hard is the phantom abnormality task? Pixel classifiers on small phantoms, split by patient.

Real spine radiographs give abnormal-vs-normal AUCs of 0.86-0.89 with a DenseNet at 224 px;
phantoms should be learnable but not trivially separable. Prints one JSON object.

    python benchmarks/phantom_difficulty.py --images 2000 --resolution 64 [--cnn]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--cnn", action="store_true", help="also train a small CNN (torch, CPU)")
    args = parser.parse_args()

    from fedspine.data.phantom import phantom_arrays

    start = time.perf_counter()
    data = phantom_arrays(args.images, args.resolution, seed=args.seed, sites=args.sites)
    render_s = time.perf_counter() - start
    train, test = patient_split(data.patient_ids, args.test_fraction, args.seed)
    x = data.images.reshape(len(data.images), -1)
    y = data.abnormal.astype(int)
    result = {
        "images": len(y),
        "resolution": args.resolution,
        "sites": args.sites,
        "seed": args.seed,
        "abnormal_fraction": round(float(y.mean()), 3),
        "train_images": int(train.sum()),
        "test_images": int(test.sum()),
        "render_seconds": round(render_s, 1),
        "auc": {},
    }
    for name, model in classifiers(args.seed).items():
        t0 = time.perf_counter()
        model.fit(x[train], y[train])
        score = model.predict_proba(x[test])[:, 1]
        result["auc"][name] = round(auc(y[test], score), 4)
        result[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
    if args.cnn:
        t0 = time.perf_counter()
        result["auc"]["small_cnn"] = round(cnn_auc(data.images, y, train, test, args.seed), 4)
        result["small_cnn_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))


def patient_split(patients: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train/test masks with every patient on one side only."""
    unique = np.unique(patients)
    rng = np.random.default_rng(seed)
    test_patients = rng.choice(unique, size=max(1, int(round(test_fraction * len(unique)))), replace=False)
    test = np.isin(patients, test_patients)
    return ~test, test


def classifiers(seed: int) -> dict:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logistic_regression": make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000)),
        "random_forest": RandomForestClassifier(n_estimators=300, min_samples_leaf=2, n_jobs=1, random_state=seed),
        "mlp": make_pipeline(
            StandardScaler(),
            MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-2, max_iter=300, early_stopping=True, random_state=seed),
        ),
    }


def auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def cnn_auc(images: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int) -> float:
    """A four-block CNN with flips, 30 epochs of Adam: a stand-in for the project's classifier."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(2)

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    model = nn.Sequential(
        block(1, 16), block(16, 32), block(32, 64), block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1)
    )
    xt = torch.from_numpy(images[train][:, None])
    yt = torch.from_numpy(y[train].astype(np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(30):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = order[i : i + 64]
            batch = xt[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            loss = nn.functional.binary_cross_entropy_with_logits(model(batch).squeeze(1), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        score = torch.sigmoid(model(torch.from_numpy(images[test][:, None])).squeeze(1)).numpy()
    return auc(y[test], score)


if __name__ == "__main__":
    main()
