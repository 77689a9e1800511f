"""PreDet (Ramanathan, Wang, Mahajan, ICCV 2021; papers/predet.txt): detection-specific pre-training.

- ``views``: two augmented views of an image with the query boxes carried into both (§3.2, §4.1).
- ``crpn``: the contrastive RPN, query-specific objectness and proposals (§3.2.1, Fig. 3).
- ``croi``: the contrastive ROI head, InfoNCE lookup and query regression (§3.2.2, Fig. 4).
- ``model``: backbone + FPN + the multi-label classification head + CRPN + CROI (§3).
"""
