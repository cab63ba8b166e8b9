"""Train, evaluate and predict; spotocc's and the released checkpoints; distributed helpers."""
