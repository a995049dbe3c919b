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

    from fedspine.data.phantom import phantom_arrays, random_conv_features

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
        "seconds": {"render": round(render_s, 1)},
        "auc": {},
        "auc_by_lesion_type": {},
    }
    types_test = [data.lesion_types[i] for i in np.flatnonzero(test)]
    features = {"pixels": x, "random_conv": random_conv_features(data.images, seed=args.seed)}
    for name, (inputs, model) in classifiers(args.seed).items():
        t0 = time.perf_counter()
        model.fit(features[inputs][train], y[train])
        score = model.predict_proba(features[inputs][test])[:, 1]
        result["auc"][name] = round(auc(y[test], score), 4)
        result["auc_by_lesion_type"][name] = by_lesion_type(y[test], score, types_test)
        result["seconds"][name] = round(time.perf_counter() - t0, 1)
    if args.cnn:
        t0 = time.perf_counter()
        score = cnn_scores(data.images, y, train, test, args.seed)
        result["auc"]["small_cnn"] = round(auc(y[test], score), 4)
        result["auc_by_lesion_type"]["small_cnn"] = by_lesion_type(y[test], score, types_test)
        result["seconds"]["small_cnn"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))


def patient_split(
    patients: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train/test masks with every patient on one side only."""
    unique = np.unique(patients)
    rng = np.random.default_rng(seed)
    test_patients = rng.choice(
        unique, size=max(1, int(round(test_fraction * len(unique)))), replace=False
    )
    test = np.isin(patients, test_patients)
    return ~test, test


def classifiers(seed: int) -> dict:
    """name -> (which inputs, untrained model): raw-pixel models and the random-filter probe."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def logistic(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))

    return {
        "pixel_logistic_regression": ("pixels", logistic(0.01)),
        "pixel_random_forest": (
            "pixels",
            RandomForestClassifier(
                n_estimators=300, min_samples_leaf=2, n_jobs=1, random_state=seed
            ),
        ),
        "pixel_mlp": (
            "pixels",
            make_pipeline(
                StandardScaler(),
                MLPClassifier(
                    hidden_layer_sizes=(256,),
                    alpha=1e-2,
                    max_iter=300,
                    early_stopping=True,
                    random_state=seed,
                ),
            ),
        ),
        "random_conv_logistic_regression": ("random_conv", logistic(0.05)),
    }


def auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def by_lesion_type(
    y: np.ndarray, score: np.ndarray, types: list[tuple[str, ...]]
) -> dict[str, float]:
    """AUC of each lesion type's images against all normal test images."""
    normal = score[y == 0]
    out = {}
    for name in sorted({t for ts in types for t in ts}):
        positive = score[[name in ts for ts in types]]
        if len(positive) >= 5:
            labels = np.r_[np.zeros(len(normal)), np.ones(len(positive))]
            out[name] = round(auc(labels, np.r_[normal, positive]), 3)
    return out


def cnn_scores(
    images: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int
) -> np.ndarray:
    """A four-block CNN with flips, 30 epochs of Adam: a stand-in for the project's classifier."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(2)

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
        )

    model = nn.Sequential(
        block(1, 16),
        block(16, 32),
        block(32, 64),
        block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 1),
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
        return torch.sigmoid(model(torch.from_numpy(images[test][:, None])).squeeze(1)).numpy()


if __name__ == "__main__":
    main()
