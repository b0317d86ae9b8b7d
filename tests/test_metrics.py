import json

import numpy as np
import pytest

from lora_cls.errors import UserError
from lora_cls.metrics.classification import classification_metrics, confusion

# Ten samples, 6 "neg" then 4 "pos"; score = probability of "pos", prediction = argmax.
#   neg scores 0.1 0.2 0.3 0.4 | 0.6 0.7   -> TN=4, FP=2
#   pos scores 0.35 | 0.65 0.8 0.9         -> FN=1, TP=3
# ROC AUC: positive-over-negative pairs = 3 + 5 + 6 + 6 = 20 of 24.
POS_SCORE = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.35, 0.65, 0.8, 0.9])
Y_TRUE = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
PROBS = np.stack([1.0 - POS_SCORE, POS_SCORE], axis=1)
CLASSES = ["neg", "pos"]


def test_binary_metrics_match_hand_computed_values():
    m = classification_metrics(Y_TRUE, PROBS, CLASSES, loss=0.25)

    assert m["n"] == 10
    assert m["loss"] == 0.25
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    # F1(neg) = 2·(4/5)(2/3)/(4/5+2/3) = 8/11; F1(pos) = 2·(3/5)(3/4)/(3/5+3/4) = 2/3.
    assert m["macro_f1"] == pytest.approx((8 / 11 + 2 / 3) / 2)
    assert m["per_class"]["neg"] == pytest.approx(
        {"precision": 4 / 5, "recall": 4 / 6, "f1": 8 / 11, "support": 6}
    )
    assert m["per_class"]["pos"] == pytest.approx(
        {"precision": 3 / 5, "recall": 3 / 4, "f1": 2 / 3, "support": 4}
    )
    assert m["roc_auc"] == pytest.approx(20 / 24)
    assert m["positive_class"] == "pos"
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)


def test_explicit_positive_class_swaps_sensitivity_and_specificity():
    default = classification_metrics(Y_TRUE, PROBS, CLASSES)
    explicit = classification_metrics(Y_TRUE, PROBS, CLASSES, positive_class="pos")
    swapped = classification_metrics(Y_TRUE, PROBS, CLASSES, positive_class="neg")

    assert explicit == default
    assert swapped["positive_class"] == "neg"
    assert swapped["sensitivity"] == pytest.approx(default["specificity"])
    assert swapped["specificity"] == pytest.approx(default["sensitivity"])
    # Ranking by P(neg) for the neg class is the same ranking reversed: same AUC.
    assert swapped["roc_auc"] == pytest.approx(20 / 24)
    assert swapped["accuracy"] == default["accuracy"]


def test_roc_auc_uses_the_positive_class_score_not_the_prediction():
    # All predictions "neg" (scores < 0.5) but perfectly ranked: accuracy 0.5, AUC 1.
    score = np.array([0.1, 0.2, 0.3, 0.4])
    m = classification_metrics(np.array([0, 0, 1, 1]), np.stack([1 - score, score], 1), CLASSES)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["roc_auc"] == pytest.approx(1.0)
    assert m["sensitivity"] == 0.0
    assert m["specificity"] == 1.0


def test_unknown_positive_class_is_a_user_error():
    with pytest.raises(UserError, match="cat"):
        classification_metrics(Y_TRUE, PROBS, CLASSES, positive_class="cat")


def test_roc_auc_is_none_when_only_one_class_is_present():
    m = classification_metrics(Y_TRUE[:6], PROBS[:6], CLASSES)
    assert m["roc_auc"] is None
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["pos"]["support"] == 0
    assert m["sensitivity"] == 0.0


def test_roc_auc_is_none_for_non_finite_scores():
    probs = PROBS.copy()
    probs[0] = np.nan
    assert classification_metrics(Y_TRUE, probs, CLASSES)["roc_auc"] is None


def test_multiclass_absent_class_gets_a_zero_support_row():
    classes = ["a", "b", "c"]
    y_true = np.array([0, 0, 0, 1, 1, 1])
    y_pred = np.array([0, 0, 2, 1, 1, 0])  # "c" never true, predicted once
    probs = np.eye(3)[y_pred] * 0.8 + 0.2 / 3

    m = classification_metrics(y_true, probs, classes)

    assert set(m) == {"loss", "accuracy", "balanced_accuracy", "macro_f1", "classes_absent", "per_class", "n"}
    assert m["classes_absent"] == ["c"]
    assert m["loss"] is None
    assert list(m["per_class"]) == classes
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["a"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    # b: precision 2/2, recall 2/3 -> F1 = 0.8
    assert m["per_class"]["b"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Balanced accuracy and macro F1 both average over the classes present in y_true ("c" is named as absent).
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_macro_f1_averages_over_the_classes_present_and_names_the_absent_one():
    classes = ["a", "b", "c"]
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 1, 1, 1])  # F1(a) = 2/3, F1(b) = 0.8, "c" nowhere
    m = classification_metrics(y_true, np.eye(3)[y_pred], classes)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)  # not (2/3 + 0.8 + 0) / 3: "c" has no image here
    assert m["per_class"]["c"]["support"] == 0 and m["classes_absent"] == ["c"]
    assert classification_metrics(y_true, np.eye(2)[y_pred], ["a", "b"])["classes_absent"] == []


def test_metrics_are_plain_json_serialisable_types():
    m = classification_metrics(
        Y_TRUE.astype(np.int32), PROBS.astype(np.float32), CLASSES, loss=np.float32(0.5)
    )
    assert json.loads(json.dumps(m)) == m

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):  # classes_absent: a list of class names
            for v in value:
                walk(v)
        else:
            assert value is None or type(value) in (float, int, str), (value, type(value))

    walk(m)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(Y_TRUE, PROBS, ["a", "b", "c"])


def test_confusion_rows_are_true_columns_are_predicted():
    cm = confusion(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), 4)
    expected = np.array(
        [
            [1, 1, 0, 0],
            [0, 1, 0, 0],
            [1, 0, 2, 0],
            [0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64
