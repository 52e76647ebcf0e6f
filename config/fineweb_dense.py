# The paper's dense baselines (SPEC section 5): the fineweb_gated setup with the gates off;
# pick the depth with --n_layer (the paper used 2, 4, ..., 12) and give each its own out_dir:
#   torchrun --standalone --nproc_per_node=4 train.py config/fineweb_dense.py --n_layer=6 --out_dir=out-fineweb-dense-6
import os
exec(open(os.path.join(os.path.dirname(__file__), 'fineweb_gated.py')).read())  # the same setup ...
# ... but dense
out_dir = 'out-fineweb-dense'
gated = False            # no gate heads, no controller, regularizer 0
n_layer = 12
