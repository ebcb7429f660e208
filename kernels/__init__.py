"""saetron.kernels: the SAE's backends (reference, torch, triton), their selection rules and kernels.

    backend.py     the interface every backend implements, and the chunked encode of the sparse ones
    selection.py   the selection rules (RowTopK, Threshold, BatchTopK) and the Selection they return
    reference.py   the reference backend: every op dense, the oracle of the tests
    torch_sparse.py, torch_select.py     the torch backend
    triton_ops.py and triton_*.py        the Triton backend (kernels, launchers, autograd Functions)
    dispatch.py    which backend runs (auto, SAETRON_BACKEND), the density gate
"""
