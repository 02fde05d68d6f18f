"""purify_fast: fast kernels and defenses for purifying backdoored or biased pre-trained models.

Layers, data flowing one way: ``cli`` → ``defenses`` → ``ops`` → kernel backends
(``purify_fast.kernels`` Triton, ``purify_fast._C`` C++/OpenMP, ``purify_fast._C_cuda`` CUDA),
with ``reference`` as the readable truth every backend is tested against.
"""

__version__ = "0.1.0"
