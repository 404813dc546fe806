"""The pieces train.py is built from: options, data, checkpoints, distributed set-up, logs.

train.py keeps the loop; each module here is one concern, small enough to read in a sitting.
"""
