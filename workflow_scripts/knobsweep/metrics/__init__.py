"""Quality metrics: official VQA v2 accuracy (`vqa`) and pycocoevalcap caption metrics (`captions`)."""

from knobsweep.metrics.captions import CAPTION_METRICS, score_captions
from knobsweep.metrics.vqa import score_vqa, vqa_accuracy

__all__ = ["CAPTION_METRICS", "score_captions", "score_vqa", "vqa_accuracy"]
