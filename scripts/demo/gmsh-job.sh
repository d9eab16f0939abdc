#!/bin/bash
# Batch script of the demo flow: meshes the geometry cone.geo from the models space
# into a CalculiX mesh (tetrahedra, .inp format) in the meshes space.
#SBATCH --time=00:05:00
#SBATCH --ntasks=1
#DATANET --stage-in models:geometry/cone.geo
#DATANET --stage-out cone.inp=meshes:cone/cone.inp
#DATANET --output meshes:cone/
set -eu
gmsh -3 cone.geo -format inp -o cone.inp
