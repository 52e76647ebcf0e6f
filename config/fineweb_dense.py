# The paper's dense baselines: the fineweb_gated setup with the gates off. Pick the depth with
# --n_layer (the paper used 2, 4, ..., 12) and give each run its own out_dir:
#   torchrun --standalone --nproc_per_node=4 train.py config/fineweb_dense.py --n_layer=6 \
#       --out_dir=out-fineweb-dense-6
import os
exec(open(os.path.join(os.path.dirname(__file__), 'fineweb_gated.py')).read())  # the same setup ...
# ... but dense
out_dir = 'out-fineweb-dense'
gated = False            # no gate heads, no controller, no regularizer
n_layer = 12
