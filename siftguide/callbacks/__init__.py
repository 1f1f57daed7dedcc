"""Lightning callbacks of a run, one per file; ``configs/callbacks/default.yaml`` lists what a run uses.

| callback | file | what it does |
|---|---|---|
| :class:`RelevanceSetup` | ``relevance_setup.py`` | keypoint caches, mean map, datasets carrying keypoints, prefetch |
| :class:`TrainTimer` | ``timer.py`` | ``train/elapsed_s``, ``train/cost_s`` (GPU / process CPU time), ``train/throughput`` |
| :class:`ValidateAtEnd` | ``validate.py`` | validates the final step of a run stopped between validations |
| :class:`NonFiniteCheck` | ``nonfinite.py`` | stops a run whose loss became NaN/inf, without a per-step host sync |
| :class:`StepProgressBar` | ``progress.py`` | one progress bar over the run's optimizer steps |
| :class:`KNNEvaluator` | ``knn.py`` | online weighted kNN on frozen features after each validation |
| :class:`AttentionDivergence` | ``attention_divergence.py`` | ``val/attn_div``: attention vs SIFT relevance, every run |
| :class:`Preemption` | ``preemption.py`` | SIGTERM / SIGINT end the fit at the current step |
| :class:`SkippedFiles` | ``skips.py`` | unreadable files: counted, one warning each, a summary, a ceiling |
| :class:`GuidanceBalance` | ``balance.py`` | warns once when a guidance term drowns the task loss |
| :class:`WeightDecaySchedule` | ``weight_decay.py`` | the weight decay along a cosine (DINO), off by default |

The learning rate is Lightning's ``LearningRateMonitor``; the periodic attention monitor with figures is
:class:`siftguide.analysis.monitor.AttentionMonitor` (``callbacks=[default,attention_monitor]``).
"""
from .attention_divergence import AttentionDivergence
from .balance import GuidanceBalance
from .instantiate import instantiate_callbacks
from .knn import KNNEvaluator, WeightedKNN
from .nonfinite import NonFiniteCheck, NonFiniteLossError
from .preemption import Preemption
from .progress import StepProgressBar
from .relevance_setup import RelevanceSetup
from .skips import SkippedFiles
from .timer import CostClock, TrainTimer
from .validate import ValidateAtEnd
from .weight_decay import WeightDecaySchedule
