"""Gradient variance probe: many gradient estimates of every estimator at the same parameters.

At fixed model parameters and a fixed batch ``x``, draws ``M`` independent estimates of the
gradient of the batch-mean objective ``(1/B) sum_b E_q[f_b]`` with respect to the *encoder*
parameters, for each estimator of a basket, and reports per parameter tensor and overall
(``param = "all"``):

- ``grad_var``: mean over coordinates of the per-coordinate variance; ``grad_var_total``: its
  sum (trace of the covariance); ``grad_var_per_feval``: ``grad_var x f_evals`` (variance at
  an equal budget of f-evaluations);
- ``grad_snr``: mean over coordinates of ``|mean| / std`` (Rainforth et al. 2018);
- ``grad_bias2``: mean over coordinates of the squared bias against a reference gradient,
  debiased for the noise of both means (``(mu - r)^2 - var/M - se_r^2``; can be slightly
  negative for unbiased estimators); ``grad_mse = grad_var + grad_bias2``; ``grad_cos``: cosine
  between the mean estimate and the reference.

Every metric has a standard error (``<metric>_se`` rows) from a delete-one-group jackknife over
``K`` groups of the ``M`` estimates (paired with the reference's groups when the reference is
itself a Monte Carlo estimate, so its noise is carried into the bias and cosine).

The reference is the exact gradient by enumeration (:mod:`estimators.exact`) when the latent
space is small enough, else the mean of many estimates of a high-sample unbiased estimator.

Batched computation: the encoder runs once; its output is replicated ``M`` times along a second
batch dimension (examples stay on the first, as estimators expect), and one backward pass gives
every replicate's gradient ``delta_m`` with respect to that output (only the encoder output is
differentiated, so the decoder's parameter gradients, and for estimators that use only ``f``'s
values the whole decoder backward, are skipped). When the encoder ends in a linear layer, that
layer's per-estimate gradients ``delta_m^T h`` are formed a few rows at a time, centred and
squared while in cache and summed per group: the ``M x P`` matrix never exists. Earlier layers
(if any) get one batched vector-Jacobian product (``autograd.grad(..., is_grads_batched=True)``).
"""
