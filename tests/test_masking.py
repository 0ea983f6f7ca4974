"""Masking: disjoint visible sets, inverse permutation, masks, keep probability."""

import jax
import numpy as np
import pytest

from lut_jax.pretrain import masking


def test_views_are_disjoint_blocks_of_one_permutation():
  batch, num_patches, ratio = 32, 196, 0.75
  m = masking.random_masks(jax.random.key(0), batch, num_patches, ratio)
  keep1, keep2 = np.asarray(m.keep1), np.asarray(m.keep2)
  restore, mask1, mask2 = np.asarray(m.ids_restore), np.asarray(m.mask1), np.asarray(m.mask2)
  keep = int(num_patches * (1 - ratio))
  assert keep == 49 and keep1.shape == keep2.shape == (batch, keep)
  for b in range(batch):
    assert len(set(keep1[b])) == keep and len(set(keep2[b])) == keep
    assert not set(keep1[b]) & set(keep2[b])
    # ids_restore inverts the shuffle whose first 2*keep entries are keep1 then keep2.
    shuffle = np.argsort(restore[b])
    np.testing.assert_array_equal(shuffle[:keep], keep1[b])
    np.testing.assert_array_equal(shuffle[keep:2 * keep], keep2[b])
    np.testing.assert_array_equal(shuffle[restore[b]], np.arange(num_patches))
    # mask == 0 exactly on the visible patches of each view.
    np.testing.assert_array_equal(np.flatnonzero(mask1[b] == 0), np.sort(keep1[b]))
    np.testing.assert_array_equal(np.flatnonzero(mask2[b] == 0), np.sort(keep2[b]))


def test_explicit_noise_fixes_the_masks():
  noise = np.array([[0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4]], np.float32)
  m = masking.masks_from_noise(noise, 0.75)  # keep 2 of 8
  np.testing.assert_array_equal(m.keep1, [[1, 5]])  # the two smallest noises
  np.testing.assert_array_equal(m.keep2, [[3, 7]])  # the next two
  np.testing.assert_array_equal(m.mask1, [[1, 0, 1, 1, 1, 0, 1, 1]])
  np.testing.assert_array_equal(m.mask2, [[1, 1, 1, 0, 1, 1, 1, 0]])


def test_each_patch_kept_with_probability_one_minus_ratio():
  batch, num_patches, ratio = 4000, 16, 0.75
  m = masking.random_masks(jax.random.key(1), batch, num_patches, ratio)
  freq = 1.0 - np.asarray(m.mask1).mean(axis=0)  # per patch, over examples
  # Binomial(4000, 0.25): std 0.0068 per patch; 5 sigma over 16 patches never trips.
  np.testing.assert_allclose(freq, 0.25, atol=0.035)
  np.testing.assert_allclose(1.0 - np.asarray(m.mask2).mean(axis=0), 0.25, atol=0.035)


@pytest.mark.parametrize("ratio", [0.4, 0.0, 1.0, -0.1])
def test_bad_ratios_are_errors(ratio):
  with pytest.raises(ValueError, match="mask_ratio"):
    masking.random_masks(jax.random.key(0), 2, 16, ratio)


def test_mae_allows_low_ratio_with_one_view():
  m = masking.random_masks(jax.random.key(0), 2, 16, 0.25, two_views=False)
  assert m.keep1.shape == (2, 12) and m.keep2.shape == (2, 0)
  assert np.all(np.asarray(m.mask2) == 1)
