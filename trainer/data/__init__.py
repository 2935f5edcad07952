"""Data: the artifact as the trainer sees it (``artifact``), the one row reader behind streaming and the device
cache (``loading``), the order of input channels with slice context (``context``), device-side transforms
(``transforms``) and network inputs and batch sources (``inputs``). Below training and inference; imports neither."""
