"""`mergesmith inspect`: what a merge will do, read from the weights before merging.

The inputs (a base and its task models, optionally a finished merge) are streamed once, tensor by
tensor in row chunks (`stream`); each tensor's task vectors feed one accumulator (`stats`), whose
matrices also feed a single-pass randomized SVD sketch (`sketch`); `survey` sums the figures per
layer and module type into the report dict, `findings` states what they mean in words, and the
report is rendered as a terminal table (`table`), JSON (`report`) and a self-contained page (`page`).
"""
